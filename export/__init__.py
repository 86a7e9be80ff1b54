"""Distillation, ONNX export, INT8 quantization, TensorRT engines, parity reports, manifests."""
