"""ONNX export of a DeployModel with dynamic batch and node count, and the torch-vs-ORT parity check.

The legacy TorchScript exporter is used (``dynamo=False``): it needs no onnxscript, keeps
LayerNorm as one ``LayerNormalization`` op at opset >= 17, and the graph is verified at several
node counts after export, since dynamic axes have been silently specialised by some exporter
versions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.deploy_model import DeployModel
from export.errors import ExportError

DEFAULT_OPSET = 17


def example_inputs(model: DeployModel, batch: int, nodes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Plausible random inputs (dB-like tokens, some nodes absent) for tracing and shape checks."""
    g = torch.Generator().manual_seed(seed)
    flat = []
    for s in model.encoder.cfg.modalities:
        flat.append(torch.randn(batch, nodes, s.n_tokens, s.token_dim, generator=g) * 10 - 60)
        present = torch.rand(batch, nodes, generator=g) > 0.2
        present[:, 0] = True
        flat.append(present)
    flat.append(torch.rand(batch, nodes, model.encoder.cfg.position_dims, generator=g) * 40)
    flat.append(model.example_structure(batch, nodes, g))
    return tuple(flat)


def export_onnx(model: DeployModel, path: str | Path, *, opset: int = DEFAULT_OPSET,
                check_nodes: tuple[int, ...] = (1, 5, 16)) -> Path:
    """Write ``model`` as ONNX with dynamic ``batch`` and ``nodes`` axes; verify it runs in ONNX
    Runtime at each of ``check_nodes`` (capped at the structural table size) within 1e-4 of torch."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: >= 17 keeps LayerNormalization as one op")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dynamic = {name: {0: "batch", 1: "nodes"} for name in model.input_names}
    dynamic.update({name: {0: "batch"} for name in model.output_names})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about shape checks that are constant by design
        torch.onnx.export(model, example_inputs(model, 2, 8), str(path), input_names=list(model.input_names),
                          output_names=list(model.output_names), dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    max_nodes = model.encoder.cfg.max_nodes
    for nodes in sorted({min(n, max_nodes) for n in check_nodes}):
        error = max_abs_error(model, path, example_inputs(model, 3, nodes, seed=nodes))
        if error > 1e-4:
            raise ExportError(f"{path}: ONNX Runtime differs from torch by {error:.3g} at {nodes} nodes")
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, names: tuple[str, ...], inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def max_abs_error(model: DeployModel, path: str | Path, inputs: tuple[torch.Tensor, ...], session=None) -> float:
    """Largest |torch - ONNX Runtime| over every output for one input tuple."""
    session = session or onnx_session(path)
    with torch.no_grad():
        expected = model(*inputs)
    got = run_onnx(session, model.input_names, inputs)
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))


@dataclass
class ParityReport:
    """Torch vs ONNX Runtime on real windows: worst output error and the task metrics of each."""

    windows: int
    max_abs_error: dict[str, float]  # output name -> max |difference|
    metrics_reference: dict[str, float]
    metrics_candidate: dict[str, float]

    def to_markdown(self, reference: str = "torch FP32", candidate: str = "ONNX Runtime") -> str:
        lines = [f"parity on {self.windows} windows: {reference} vs {candidate}", "",
                 "| output | max abs error |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in self.max_abs_error.items()]
        lines += ["", f"| metric | {reference} | {candidate} |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4g} | {self.metrics_candidate.get(k, float('nan')):.4g} |"
                  for k, v in self.metrics_reference.items()]
        return "\n".join(lines) + "\n"
