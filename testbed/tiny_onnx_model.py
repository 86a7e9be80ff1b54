"""A tiny, deterministic placement model in ONNX (built with ``onnx.helper``, no torch) plus its numpy twin.

It takes exactly the inputs a real SPAR export takes for a site (``spar_wire.model_manifest``
convention, dynamic batch and node axes) so the aggregator, the backends and the benchmarks can be
exercised end to end without training anything. Every input changes the output, masked nodes do not.

Graph, for batch B, nodes N, per modality m with tokens [B, N, M_m, D_m]::

    w_m      = float(present_m)                                   [B, N]
    pooled_m = sum_n w_m * mean_tokens(tokens_m) / max(sum_n w_m, 1)   [B, D_m]
    h        = sum_m tanh(pooled_m @ W_m + b_m)                   [B, hidden]
    any      = max_m w_m                                          [B, N]
    ctx      = masked mean over nodes (weights any) of [positions, node_index]   [B, d_S + 1]
    embedding = h + 0.1 * tanh(ctx @ P + p)                       [B, hidden]   (output, kind raw)
    logits    = embedding @ H + c                                 [B, n_classes] (output, class_logits)

Usage: ``python -m testbed.tiny_onnx_model configs/sites/parking_lot.toml models/tiny``.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spar_wire.model_manifest import (
    NODE_INDEX_INPUT,
    POSITIONS_INPUT,
    ModalityRequirement,
    ModelManifest,
    TensorSpec,
    load_manifest,
    present_input,
    tokens_input,
)
from spar_wire.site_layout import SiteLayout, load_site_layout

OPSET = 17
# IR 8 is what opset 17 shipped with: older ONNX Runtime / TensorRT parsers (JetPack) refuse newer IRs.
IR_VERSION = 8
CONTEXT_SCALE = 0.1  # keeps the positions/node_index term small next to the modality terms
DEFAULT_CLASSES = ("none", "motorcycle", "car", "van", "truck")


@dataclass(frozen=True)
class TinyWeights:
    """All parameters of the tiny model, float32. Modalities in layout order (the sum order)."""

    modalities: tuple[str, ...]
    modality_weight: dict[str, np.ndarray]  # m -> [D_m, hidden]
    modality_bias: dict[str, np.ndarray]  # m -> [hidden]
    context_weight: np.ndarray  # [d_S + 1, hidden]
    context_bias: np.ndarray  # [hidden]
    head_weight: np.ndarray  # [hidden, n_classes]
    head_bias: np.ndarray  # [n_classes]


def tiny_weights(layout: SiteLayout, *, n_classes: int = 5, hidden: int = 16, seed: int = 0) -> TinyWeights:
    """The weights ``build_tiny_model`` uses for the same arguments (fixed by ``seed``)."""
    if n_classes < 1 or hidden < 1:
        raise ValueError(f"n_classes and hidden must be positive, got {n_classes}, {hidden}")
    rng = np.random.default_rng(seed)

    def normal(scale: float, shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(0.0, scale, shape).astype(np.float32)

    weight, bias = {}, {}
    for name, spec in layout.modalities.items():
        dim = spec.features.token_dim
        weight[name] = normal(1.0 / np.sqrt(dim), (dim, hidden))
        bias[name] = normal(0.1, (hidden,))
    d_ctx = layout.position_dim + 1
    return TinyWeights(
        modalities=tuple(layout.modalities), modality_weight=weight, modality_bias=bias,
        context_weight=normal(0.05, (d_ctx, hidden)), context_bias=normal(0.1, (hidden,)),
        head_weight=normal(1.0 / np.sqrt(hidden), (hidden, n_classes)), head_bias=normal(0.1, (n_classes,)),
    )


def class_names(n_classes: int) -> tuple[str, ...]:
    """("none", "motorcycle", "car", "van", "truck")[:n], then "c5", "c6", ... when more."""
    return DEFAULT_CLASSES[:n_classes] + tuple(f"c{i}" for i in range(len(DEFAULT_CLASSES), n_classes))


# --------------------------------------------------------------------------- numpy reference
def reference_forward(inputs: dict[str, np.ndarray], weights: TinyWeights) -> dict[str, np.ndarray]:
    """The model in numpy (float64 inside, float32 out).

    Returns ``logits`` [B, n_classes] and ``embedding`` [B, hidden].
    """

    def masked_node_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # values [B, N, F], mask [B, N] in {0, 1} -> [B, F]; an all-absent row gives zeros
        total = (values * mask[..., None]).sum(axis=1)
        return total / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)

    embedding = 0.0
    any_present = None
    for m in weights.modalities:
        mask = inputs[present_input(m)].astype(np.float64)
        tokens = inputs[tokens_input(m)].astype(np.float64).mean(axis=2)  # [B, N, D]
        pooled = masked_node_mean(tokens, mask)
        embedding = embedding + np.tanh(pooled @ weights.modality_weight[m].astype(np.float64)
                                        + weights.modality_bias[m])
        any_present = mask if any_present is None else np.maximum(any_present, mask)
    context = np.concatenate([inputs[POSITIONS_INPUT].astype(np.float64),
                              inputs[NODE_INDEX_INPUT].astype(np.float64)[..., None]], axis=2)
    pooled_ctx = masked_node_mean(context, any_present)
    embedding = embedding + CONTEXT_SCALE * np.tanh(pooled_ctx @ weights.context_weight.astype(np.float64)
                                                    + weights.context_bias)
    logits = embedding @ weights.head_weight.astype(np.float64) + weights.head_bias
    return {"logits": logits.astype(np.float32), "embedding": embedding.astype(np.float32)}


def make_inputs(layout: SiteLayout, batch: int, n_nodes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid random input dict: tokens U[0, 1), ~75 % of nodes present (at least one per sample and
    modality), positions in metres within +-20 m, node_index a permutation of 0..N-1 per sample."""
    if batch < 1 or n_nodes < 1:
        raise ValueError(f"batch and n_nodes must be positive, got {batch}, {n_nodes}")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, spec in layout.modalities.items():
        shape = (batch, n_nodes, spec.features.n_tokens, spec.features.token_dim)
        out[tokens_input(name)] = rng.random(shape, dtype=np.float32)
        present = rng.random((batch, n_nodes)) < 0.75
        present[np.arange(batch), rng.integers(0, n_nodes, batch)] = True
        out[present_input(name)] = present
    out[POSITIONS_INPUT] = rng.uniform(-20.0, 20.0, (batch, n_nodes, layout.position_dim)).astype(np.float32)
    out[NODE_INDEX_INPUT] = np.stack([rng.permutation(n_nodes) for _ in range(batch)]).astype(np.int64)
    return out


# --------------------------------------------------------------------------- ONNX export
def build_tiny_model(layout: SiteLayout, out_dir: str | Path, *, n_classes: int = 5, hidden: int = 16,
                     seed: int = 0, name: str = "tiny-spar", max_nodes: int = 64) -> ModelManifest:
    """Write ``model.onnx`` and ``manifest.json`` for ``layout`` into ``out_dir``; return the manifest
    as loaded back from disk (so it is known to parse). Weights: ``tiny_weights(layout, ...)``."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be positive, got {max_nodes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(layout, n_classes=n_classes, hidden=hidden, seed=seed)
    model = _onnx_model(layout, weights, name)
    onnx.checker.check_model(model, full_check=True)
    model_path = out_dir / "model.onnx"
    model_path.write_bytes(model.SerializeToString())

    inputs: list[TensorSpec] = []
    for m, spec in layout.modalities.items():
        inputs.append(TensorSpec(tokens_input(m), "float32",
                                 ("batch", "nodes", spec.features.n_tokens, spec.features.token_dim)))
        inputs.append(TensorSpec(present_input(m), "bool", ("batch", "nodes")))
    inputs.append(TensorSpec(POSITIONS_INPUT, "float32", ("batch", "nodes", layout.position_dim)))
    inputs.append(TensorSpec(NODE_INDEX_INPUT, "int64", ("batch", "nodes")))
    manifest = ModelManifest(
        name=name, version="0.1.0", task="classification", artifact_file=model_path.name,
        artifact_format="onnx", precision="fp32", sha256=hashlib.sha256(model_path.read_bytes()).hexdigest(),
        position_dim=layout.position_dim, node_range=(1, max_nodes),
        modalities={m: ModalityRequirement(s.features.hash, s.features.n_tokens, s.features.token_dim)
                    for m, s in layout.modalities.items()},
        inputs=tuple(inputs),
        outputs=(TensorSpec("logits", "float32", ("batch", n_classes), "class_logits"),
                 TensorSpec("embedding", "float32", ("batch", hidden), "raw")),
        class_names=class_names(n_classes), metric={},
    )
    manifest_path = out_dir / "manifest.json"
    manifest.write(manifest_path)
    return load_manifest(manifest_path)


class _Graph:
    """Collects nodes and initialisers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        self._count += 1
        output = output or f"{op_type.lower()}_{self._count}"
        node_name = f"{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=node_name, **attrs))
        return output

    def masked_node_mean(self, values: str, mask: str, prefix: str) -> str:
        """values [B, N, F], mask [B, N] float -> [B, F]; zero where no node is present."""
        weighted = self.op("Mul", [values, self.op("Unsqueeze", [mask, "axis_2"])])
        total = self.op("ReduceSum", [weighted, "axis_1"], keepdims=0)  # [B, F]
        count = self.op("ReduceSum", [mask, "axis_1"], keepdims=1)  # [B, 1]
        # max(count, 1): an all-absent sample divides 0 by 1 instead of 0 by 0
        return self.op("Div", [total, self.op("Max", [count, "one"])], f"{prefix}_pooled")


def _onnx_model(layout: SiteLayout, weights: TinyWeights, name: str) -> onnx.ModelProto:
    g = _Graph()
    g.const("axis_1", np.array([1], dtype=np.int64))
    g.const("axis_2", np.array([2], dtype=np.int64))
    g.const("one", np.array(1.0, dtype=np.float32))
    g.const("context_scale", np.array(CONTEXT_SCALE, dtype=np.float32))
    graph_inputs = []
    hidden_terms, masks = [], []
    for m in weights.modalities:
        features = layout.modalities[m].features
        graph_inputs += [
            helper.make_tensor_value_info(tokens_input(m), TensorProto.FLOAT,
                                          ["batch", "nodes", features.n_tokens, features.token_dim]),
            helper.make_tensor_value_info(present_input(m), TensorProto.BOOL, ["batch", "nodes"]),
        ]
        mask = g.op("Cast", [present_input(m)], f"{m}_mask", to=TensorProto.FLOAT)
        # opset 17: ReduceMean takes axes as an attribute (ReduceSum already as an input)
        token_mean = g.op("ReduceMean", [tokens_input(m)], f"{m}_token_mean", axes=[2], keepdims=0)
        pooled = g.masked_node_mean(token_mean, mask, m)
        projected = g.op("Add", [g.op("MatMul", [pooled, g.const(f"{m}_weight", weights.modality_weight[m])]),
                                 g.const(f"{m}_bias", weights.modality_bias[m])])
        hidden_terms.append(g.op("Tanh", [projected], f"{m}_hidden"))
        masks.append(mask)
    graph_inputs += [
        helper.make_tensor_value_info(POSITIONS_INPUT, TensorProto.FLOAT,
                                      ["batch", "nodes", layout.position_dim]),
        helper.make_tensor_value_info(NODE_INDEX_INPUT, TensorProto.INT64, ["batch", "nodes"]),
    ]
    any_present = masks[0] if len(masks) == 1 else g.op("Max", masks, "any_present")
    index = g.op("Unsqueeze", [g.op("Cast", [NODE_INDEX_INPUT], to=TensorProto.FLOAT), "axis_2"])
    context = g.op("Concat", [POSITIONS_INPUT, index], "context", axis=2)  # [B, N, d_S + 1]
    pooled_ctx = g.masked_node_mean(context, any_present, "context")
    ctx_term = g.op("Mul", [g.op("Tanh", [g.op("Add", [
        g.op("MatMul", [pooled_ctx, g.const("context_weight", weights.context_weight)]),
        g.const("context_bias", weights.context_bias)])]), "context_scale"])
    total = hidden_terms[0]
    for term in hidden_terms[1:]:
        total = g.op("Add", [total, term])
    embedding = g.op("Add", [total, ctx_term], "embedding")
    g.op("Add", [g.op("MatMul", [embedding, g.const("head_weight", weights.head_weight)]),
                 g.const("head_bias", weights.head_bias)], "logits")

    hidden, n_classes = weights.head_weight.shape
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])]
    graph = helper.make_graph(g.nodes, name, graph_inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="spar-edge testbed.tiny_onnx_model")
    model.ir_version = IR_VERSION
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny ONNX placement model + manifest for a site.")
    parser.add_argument("layout", help="site layout TOML (configs/sites/*.toml)")
    parser.add_argument("out_dir")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-nodes", type=int, default=64)
    args = parser.parse_args(argv)
    manifest = build_tiny_model(load_site_layout(args.layout), args.out_dir, n_classes=args.classes,
                                hidden=args.hidden, seed=args.seed, max_nodes=args.max_nodes)
    print(f"wrote {manifest.artifact_path} and {manifest.source} ({len(manifest.inputs)} inputs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
