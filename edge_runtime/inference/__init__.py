"""Inference backends (ONNX Runtime, native TensorRT) behind one interface; see ``backend.BACKENDS``.

Importing this package loads neither onnxruntime nor tensorrt: a backend's module is imported only
when :func:`load_backend` picks it.
"""

from __future__ import annotations

from edge_runtime.inference.backend import (
    AUTO,
    BACKEND_NAMES,
    BACKENDS,
    DEVICES,
    PREFERENCES,
    BackendInfo,
    BackendOptions,
    InferenceBackend,
    backend_info,
    backend_table_markdown,
    check_inputs,
    dummy_inputs,
    load_backend,
    select_backend,
    verify_artifact,
)

__all__ = [
    "AUTO", "BACKENDS", "BACKEND_NAMES", "DEVICES", "PREFERENCES", "BackendInfo", "BackendOptions",
    "InferenceBackend", "backend_info", "backend_table_markdown", "check_inputs", "dummy_inputs",
    "load_backend", "select_backend", "verify_artifact",
]
