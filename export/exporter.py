"""Checkpoint -> ``model.onnx`` + ``manifest.json`` (+ parity report on real windows).

``model.onnx`` has fused attention (``export.attention``; ONNX Runtime runs it). When its fused op is
one TensorRT 10 cannot parse, ``model.plain.onnx`` (+ ``model.plain.manifest.json``) is written
beside it with the split attention: the graph TensorRT engines and their INT8 Q/DQ source are built
from (``export.formats``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.attention import DEFAULT_ATTENTION, needs_plain_graph
from export.deploy_model import DeployModel, deploy_model_from_checkpoints
from export.errors import ExportError
from export.formats import export_format, report_name
from export.manifests import manifest_for, manifest_path_for
from export.onnx_export import DEFAULT_OPSET, ParityReport, export_onnx


@dataclass
class OnnxExportResult:
    onnx: Path
    manifest: Path
    parity: ParityReport | None
    attention: str = DEFAULT_ATTENTION
    plain: Path | None = None  # model.plain.onnx when written
    plain_manifest: Path | None = None


def load_deployable(paths: list[str]) -> tuple[DeployModel, dict]:
    """A DeployModel from one distilled checkpoint or from fine-tuned checkpoints sharing an encoder;
    also the data description of its training set."""
    from train.checkpoint import load_checkpoint
    from train.errors import TrainError

    try:
        if len(paths) == 1 and load_checkpoint(paths[0])["kind"] == "distilled":
            from export.distill import load_student

            model, ckpt = load_student(paths[0])
            return model.eval(), ckpt["data"]
        model, ckpts = deploy_model_from_checkpoints(paths)
    except TrainError as exc:
        raise ExportError(str(exc)) from None
    return model, ckpts[0]["data"]


def export_checkpoints(paths: list[str], out_dir: str | Path, *, name: str, version: str,
                       data: str | None = None, val_fraction: float = 0.25, opset: int = DEFAULT_OPSET,
                       max_windows: int | None = None, attention: str = DEFAULT_ATTENTION,
                       plain: bool = True) -> OnnxExportResult:
    """Export with ``attention`` (``export.attention.ATTENTION_MODES``), verify at several node counts,
    score torch vs ONNX Runtime on the validation windows of ``data`` (when given) and write the
    manifest with that metric. With ``plain`` and a fused op TensorRT cannot parse, also write
    ``model.plain.onnx`` and its manifest (scored the same way)."""
    model, data_info = load_deployable(paths)
    out_dir = Path(out_dir)
    # (format, attention) per graph, the default graph first; file and report names are the table's
    graphs = [(export_format("onnx"), attention)]
    if plain and needs_plain_graph(attention):
        graphs.append((export_format("onnx-plain"), "plain"))
    written = []  # (onnx path, manifest path, parity) per graph, the default graph first
    for fmt, mode in graphs:
        onnx_path = export_onnx(model, out_dir / fmt.file, opset=opset, attention=mode)
        parity = None
        metric: dict[str, float] = {}
        if data:
            parity = parity_on_dataset(model, onnx_path, data, data_info, val_fraction, max_windows)
            text = parity.to_markdown("torch FP32", f"ONNX Runtime FP32 ({mode} attention)")
            (out_dir / report_name(fmt.file)).write_text(text)
            metric = dict(parity.metrics_candidate)
        manifest = manifest_for(model, data_info, onnx_path, name=name, version=version, metric=metric)
        manifest_path = manifest_path_for(onnx_path)
        manifest.write(manifest_path)
        written.append((onnx_path, manifest_path, parity))
    (onnx_path, manifest_path, parity), *rest = written
    plain_paths = rest[0][:2] if rest else (None, None)
    return OnnxExportResult(onnx_path, manifest_path, parity, attention, *plain_paths)


def parity_on_dataset(model: DeployModel, onnx_path: Path, data: str, data_info: dict, val_fraction: float,
                      max_windows: int | None = None) -> ParityReport:
    from export.parity import onnx_runner, parity_report
    from train.data import load_windows, temporal_split

    windows = load_windows(data, limit=max_windows, progress=False)
    if dict(windows.feature_hashes) != data_info["feature_hashes"]:
        raise ExportError(f"{data} has feature configs {dict(windows.feature_hashes)}, the model was trained on "
                          f"{data_info['feature_hashes']}")
    _, val_idx = temporal_split(len(windows), val_fraction)
    return parity_report(model, onnx_runner(onnx_path), windows, val_idx)
