"""Model manifest: what a deployed model expects and promises, next to every artifact.

Written by ``export/`` beside each ONNX / TensorRT file and read by the aggregator, which refuses
a model whose feature hashes or modalities do not match the site. JSON, e.g.::

    {
      "format": "spar-model", "version": 1,
      "model": {"name": "spar-parking-lot", "version": "0.1.0", "task": "classification"},
      "artifact": {"file": "model.onnx", "format": "onnx", "precision": "fp32", "sha256": "..."},
      "site": {"position_dim": 2, "node_range": [1, 16],
               "modalities": {"microphone": {"feature_hash": "...", "n_tokens": 32, "token_dim": 128}}},
      "inputs":  [{"name": "tokens_microphone", "dtype": "float32", "shape": ["batch", "nodes", 32, 128]},
                  {"name": "present_microphone", "dtype": "bool", "shape": ["batch", "nodes"]},
                  {"name": "positions", "dtype": "float32", "shape": ["batch", "nodes", 2]},
                  {"name": "node_index", "dtype": "int64", "shape": ["batch", "nodes"]}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 5], "kind": "class_logits"}],
      "class_names": ["none", "motorcycle", "car", "van", "truck"],
      "metric": {"name": "accuracy", "value": 0.91},
      "training_site": {"site_id": "parking_lot",
                        "nodes": [{"id": "n01", "position": [0.0, 0.0]}, {"id": "n02", "position": [13.0, 1.5]}]}
    }

Input convention (one placement tensor per window, batched): per modality ``m``
``tokens_{m}`` [B, N, m, D] float32 and ``present_{m}`` [B, N] bool (False: zero-padded, masked);
shared ``positions`` [B, N, d_S] float32 (metres, the model normalises) and ``node_index`` [B, N]
int64 (structural slot of each node). N is the node count, dynamic within ``node_range``.

A SPAR+LLM model takes ``node_text`` [B, N, E] float32 instead of ``node_index``: the embeddings of
each node's placement description (spar_wire.placement_text), and names the text encoder that made
its training embeddings in ``site.text_model``; the aggregator refuses to feed it another one.

``training_site`` (optional) is the layout the model was trained on, in slot order: node i of its
``nodes`` is the node whose rows the model learned as structural slot ``node_index`` = i. With it
the aggregator binds another site's nodes to trained slots by id (else by the nearest trained
position) instead of by layout order; manifests written before it existed still load (binding
unknown).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spar_wire.errors import WireError
from spar_wire.numbers import is_finite_vector
from spar_wire.topics import check_id

FORMAT = "spar-model"
FORMAT_VERSION = 1
TASKS = ("classification", "localization", "detection", "event_localization", "embedding", "multitask")
ARTIFACT_FORMATS = ("onnx", "tensorrt")
OUTPUT_KINDS = ("class_logits", "regression", "raw")
DTYPES = ("float32", "float16", "int64", "int32", "bool")
DYNAMIC_DIMS = ("batch", "nodes")
POSITIONS_INPUT = "positions"
NODE_INDEX_INPUT = "node_index"
NODE_TEXT_INPUT = "node_text"  # SPAR+LLM: [B, N, E] float32 description embeddings instead of node_index


def tokens_input(modality: str) -> str:
    """Name of the tokens input of ``modality``: [B, N, m, D] float32."""
    return f"tokens_{modality}"


def present_input(modality: str) -> str:
    """Name of the presence-mask input of ``modality``: [B, N] bool."""
    return f"present_{modality}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints, or "batch" / "nodes" for dynamic axes
    kind: str = "raw"  # outputs only: how the aggregator presents it (see OUTPUT_KINDS)


@dataclass(frozen=True)
class ModalityRequirement:
    feature_hash: str
    n_tokens: int
    token_dim: int


@dataclass(frozen=True)
class TrainedNode:
    """One structural slot's training node: its id and position (metres, ``position_dim`` values)."""

    id: str
    position: tuple[float, ...]


@dataclass(frozen=True)
class TrainingSite:
    """The layout a model was trained on; ``nodes[i]`` is the node of structural slot i (node_index i)."""

    site_id: str
    nodes: tuple[TrainedNode, ...]

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "nodes": [{"id": n.id, "position": list(n.position)} for n in self.nodes]}


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: str
    artifact_file: str  # relative to the manifest's folder
    artifact_format: str
    precision: str
    sha256: str
    position_dim: int
    node_range: tuple[int, int]
    modalities: dict[str, ModalityRequirement]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    class_names: tuple[str, ...] = ()
    metric: dict[str, Any] = field(default_factory=dict)
    text_model: str = ""  # SPAR+LLM: the description encoder (spar_wire.placement_text.text_model_id)
    # How the model was made (budget preset, teacher fine-tuning, commit): read by people and reports.
    training: dict[str, Any] = field(default_factory=dict)
    # Which nodes (ids, positions) the structural slots were trained on; None in older manifests.
    training_site: TrainingSite | None = None
    source: str = field(default="<memory>", compare=False)

    @property
    def needs_text(self) -> bool:
        """True when the model takes node_text (description embeddings) rather than node_index."""
        return any(t.name == NODE_TEXT_INPUT for t in self.inputs)

    @property
    def artifact_path(self) -> Path:
        return Path(self.source).parent / self.artifact_file

    def verify_artifact(self) -> None:
        """WireError("bad_manifest") unless the artifact exists and its sha256 matches."""
        path = self.artifact_path
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise WireError("bad_manifest", f"{self.source}: artifact {path}: {exc.strerror or exc}") from None
        if digest != self.sha256:
            raise WireError("bad_manifest", f"{self.source}: sha256 of {path} is {digest[:12]}..., "
                            f"the manifest says {self.sha256[:12]}...")

    def to_dict(self) -> dict[str, Any]:
        def spec(t: TensorSpec, output: bool) -> dict[str, Any]:
            out = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
            return {**out, "kind": t.kind} if output else out

        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "model": {"name": self.name, "version": self.version, "task": self.task},
            "artifact": {"file": self.artifact_file, "format": self.artifact_format,
                         "precision": self.precision, "sha256": self.sha256},
            "site": {"position_dim": self.position_dim, "node_range": list(self.node_range),
                     "modalities": {k: {"feature_hash": v.feature_hash, "n_tokens": v.n_tokens,
                                        "token_dim": v.token_dim} for k, v in self.modalities.items()},
                     **({"text_model": self.text_model} if self.text_model else {})},
            "inputs": [spec(t, False) for t in self.inputs],
            "outputs": [spec(t, True) for t in self.outputs],
            "class_names": list(self.class_names), "metric": dict(self.metric),
            **({"training": dict(self.training)} if self.training else {}),
            **({"training_site": self.training_site.to_dict()} if self.training_site else {}),
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_manifest(path: str | Path) -> ModelManifest:
    """Read and validate ``manifest.json``; WireError("bad_manifest") naming the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WireError("bad_manifest", f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WireError("bad_manifest", f"{path}: not JSON: {exc}") from None
    try:
        return _parse(data, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError("bad_manifest", f"{path}: missing or malformed field: {exc!r}") from None


def _parse(data: dict[str, Any], source: str) -> ModelManifest:
    def fail(message: str) -> WireError:
        return WireError("bad_manifest", f"{source}: {message}")

    if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        raise fail(f"not a {FORMAT} v{FORMAT_VERSION} manifest")
    model, artifact, site = data["model"], data["artifact"], data["site"]
    if model["task"] not in TASKS:
        raise fail(f"model.task must be one of {TASKS}, got {model['task']!r}")
    if artifact["format"] not in ARTIFACT_FORMATS:
        raise fail(f"artifact.format must be one of {ARTIFACT_FORMATS}, got {artifact['format']!r}")
    low, high = (int(v) for v in site["node_range"])
    if not 1 <= low <= high:
        raise fail(f"site.node_range must be [low, high] with 1 <= low <= high, got {site['node_range']}")
    modalities = {check_id(name, "modality"): ModalityRequirement(str(m["feature_hash"]), int(m["n_tokens"]),
                                                                  int(m["token_dim"]))
                  for name, m in site["modalities"].items()}
    if not modalities:
        raise fail("site.modalities is empty")
    inputs = tuple(_tensor(t, False, fail) for t in data["inputs"])
    outputs = tuple(_tensor(t, True, fail) for t in data["outputs"])
    if not outputs:
        raise fail("outputs is empty")
    position_dim = int(site["position_dim"])
    training_site = _training_site(data["training_site"], position_dim, high, fail) \
        if data.get("training_site") is not None else None
    text_model = str(site.get("text_model", ""))
    if any(t.name == NODE_TEXT_INPUT for t in inputs) and not text_model:
        raise fail(f"input {NODE_TEXT_INPUT!r} needs site.text_model (which encoder made the embeddings)")
    return ModelManifest(
        name=str(model["name"]), version=str(model["version"]), task=model["task"],
        artifact_file=str(artifact["file"]), artifact_format=artifact["format"],
        precision=str(artifact.get("precision", "fp32")), sha256=str(artifact["sha256"]),
        position_dim=position_dim, node_range=(low, high), modalities=modalities,
        inputs=inputs, outputs=outputs, class_names=tuple(str(c) for c in data.get("class_names", ())),
        metric=dict(data.get("metric", {})), text_model=text_model, training=dict(data.get("training", {})),
        training_site=training_site, source=source,
    )


def _tensor(raw: dict[str, Any], output: bool, fail) -> TensorSpec:
    name, dtype, shape = str(raw["name"]), raw["dtype"], tuple(raw["shape"])
    if dtype not in DTYPES:
        raise fail(f"tensor {name!r}: dtype must be one of {DTYPES}, got {dtype!r}")
    for dim in shape:
        if not ((isinstance(dim, int) and dim > 0) or dim in DYNAMIC_DIMS):
            raise fail(f"tensor {name!r}: shape entries must be positive ints or {DYNAMIC_DIMS}, got {dim!r}")
    kind = raw.get("kind", "raw") if output else "raw"
    if kind not in OUTPUT_KINDS:
        raise fail(f"output {name!r}: kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    return TensorSpec(name, dtype, shape, kind)


def _training_site(raw: Any, position_dim: int, max_nodes: int, fail) -> TrainingSite:
    """Parse ``training_site``: a site id and 1..max_nodes nodes with unique ids and finite positions of
    ``position_dim`` values, in slot order."""
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list):
        raise fail("training_site must be an object with 'site_id' and a list 'nodes'")
    try:
        site_id = check_id(raw.get("site_id"), "training_site.site_id")
    except WireError as exc:
        raise fail(exc.detail) from None
    nodes: list[TrainedNode] = []
    for slot, node in enumerate(raw["nodes"]):
        where = f"training_site.nodes[{slot}]"
        if not isinstance(node, dict):
            raise fail(f"{where} must be an object with 'id' and 'position'")
        try:
            node_id = check_id(node.get("id"), f"{where}.id")
        except WireError as exc:
            raise fail(exc.detail) from None
        position = node.get("position")
        if not isinstance(position, list) or not is_finite_vector(position, (position_dim,)):
            raise fail(f"{where} ({node_id}): position must be {position_dim} finite numbers, got {position!r}")
        nodes.append(TrainedNode(node_id, tuple(float(v) for v in position)))
    if not 1 <= len(nodes) <= max_nodes:
        raise fail(f"training_site has {len(nodes)} nodes, the model has 1..{max_nodes} slots (site.node_range)")
    ids = [n.id for n in nodes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise fail(f"training_site: node ids must be unique, repeated: {', '.join(duplicates)}")
    return TrainingSite(site_id, tuple(nodes))

