"""Manifests beside every exported artifact (see spar_wire.model_manifest for the format)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from export.deploy_model import DeployModel
from export.formats import manifest_name
from spar_wire.model_manifest import (
    NODE_TEXT_INPUT,
    ModalityRequirement,
    ModelManifest,
    TensorSpec,
    TrainedNode,
    TrainingSite,
    load_manifest,
)
from spar_wire.placement_text import text_model_id

# train task -> manifest task
TASK_NAMES = {"classify": "classification", "localize": "localization", "detect": "detection",
              "quake": "event_localization"}


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_for(model: DeployModel, data_info: dict[str, Any], artifact: Path, *, name: str, version: str,
                 precision: str = "fp32", artifact_format: str = "onnx", metric: dict[str, Any] | None = None,
                 node_range: tuple[int, int] | None = None) -> ModelManifest:
    """The manifest of ``artifact`` exported from ``model``; ``data_info`` is the checkpoint's record of
    its training data (feature hashes, class names, and the site: its node ids and positions in slot
    order, recorded as the manifest's ``training_site``)."""
    cfg = model.encoder.cfg
    hashes = data_info["feature_hashes"]
    modalities = {s.name: ModalityRequirement(hashes[s.name], s.n_tokens, s.token_dim) for s in cfg.modalities}
    inputs: list[TensorSpec] = []
    for s in cfg.modalities:
        inputs += [TensorSpec(f"tokens_{s.name}", "float32", ("batch", "nodes", s.n_tokens, s.token_dim)),
                   TensorSpec(f"present_{s.name}", "bool", ("batch", "nodes"))]
    inputs.append(TensorSpec("positions", "float32", ("batch", "nodes", cfg.position_dims)))
    text_model = ""
    if model.structure_input == NODE_TEXT_INPUT:
        inputs.append(TensorSpec(NODE_TEXT_INPUT, "float32", ("batch", "nodes", cfg.text_dims)))
        text_model = str(data_info.get("text_model") or text_model_id())
    else:
        inputs.append(TensorSpec("node_index", "int64", ("batch", "nodes")))
    outputs = tuple(TensorSpec(o.name, "float32", ("batch", *o.dims), o.kind) for o in model.outputs)
    tasks = [TASK_NAMES[t] for t in model.heads]
    node_range = node_range or (1, cfg.max_nodes)
    return ModelManifest(
        name=name, version=version, task=tasks[0] if len(tasks) == 1 else "multitask",
        artifact_file=artifact.name, artifact_format=artifact_format, precision=precision,
        sha256=sha256_of(artifact), position_dim=cfg.position_dims,
        node_range=node_range, modalities=modalities, inputs=tuple(inputs),
        outputs=outputs, class_names=tuple(data_info.get("class_names", ())), metric=dict(metric or {}),
        text_model=text_model, training_site=training_site_of(data_info.get("site"), node_range[1], cfg.position_dims),
        source=str(manifest_path_for(artifact)))


def training_site_of(site: dict[str, Any] | None, max_nodes: int, position_dim: int) -> TrainingSite | None:
    """The manifest's ``training_site`` from a checkpoint's site record (``id``, ``node_ids``, ``positions``
    [N, d_S], node i = structural slot i: training feeds node_index = arange(N), and fine-tuning on a new
    layout rewrites the table so that row i is that layout's node i). None when the record is absent or
    does not describe one slot per node (older checkpoints): the aggregator then warns that the binding
    is unknown instead of trusting a guess."""
    if not site or not site.get("id") or not site.get("node_ids"):
        return None
    ids, positions = list(site["node_ids"]), list(site.get("positions") or [])
    if len(ids) != len(positions) or len(ids) > max_nodes or any(len(p) != position_dim for p in positions):
        return None
    return TrainingSite(str(site["id"]), tuple(TrainedNode(str(i), tuple(float(v) for v in p))
                                               for i, p in zip(ids, positions, strict=True)))


def derive_manifest(base: ModelManifest | str | Path, artifact: Path, *, artifact_format: str, precision: str,
                    metric: dict[str, Any] | None = None, node_range: tuple[int, int] | None = None) -> ModelManifest:
    """The manifest of an artifact made from another one (INT8 ONNX, a TensorRT engine): same inputs,
    outputs and site constraints, new file, hash, precision and metric."""
    if not isinstance(base, ModelManifest):
        base = load_manifest(base)
    return dataclasses.replace(base, artifact_file=artifact.name, artifact_format=artifact_format,
                               precision=precision, sha256=sha256_of(artifact),
                               metric=dict(metric if metric is not None else base.metric),
                               node_range=node_range or base.node_range, source=str(manifest_path_for(artifact)))


def manifest_path_for(artifact: Path) -> Path:
    """Where an artifact's manifest goes: ``manifest.json`` for ``model.onnx``, else
    ``<stem>.manifest.json`` (several artifacts can share a folder; ``export.formats.manifest_name``)."""
    return artifact.parent / manifest_name(artifact.name)
