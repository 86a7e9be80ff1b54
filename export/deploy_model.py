"""The deployed graph: frozen encoder + one or more task heads, flat named tensors in and out.

Inputs follow the manifest convention of ``spar_wire.model_manifest`` (per modality
``tokens_{m}`` [B, N, m, D] float32 dB and ``present_{m}`` [B, N] bool; ``positions`` [B, N, d_S]
float32 metres; ``node_index`` [B, N] int64, or for SPAR+LLM ``node_text`` [B, N, E] float32, the
embeddings of the nodes' placement descriptions), so the aggregator feeds exactly what it assembles.
Outputs are in user units: class logits, positions in metres (the per-window normalisation is
undone inside the graph). There is no masking and no augmentation on this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spar_wire.model_manifest import (
    NODE_INDEX_INPUT,
    NODE_TEXT_INPUT,
    POSITIONS_INPUT,
    present_input,
    tokens_input,
)
from train.batch import Batch
from train.heads import run_head
from train.models.spar import SparEncoder


@dataclass(frozen=True)
class OutputSpec:
    """One graph output: its name, manifest kind, and the head/key it comes from."""

    name: str
    kind: str  # class_logits | regression | raw (spar_wire.model_manifest.OUTPUT_KINDS)
    task: str
    key: str  # which part of the head's output (detector: logits / positions)
    dims: tuple[int | str, ...]  # shape after the batch axis


def output_specs(task: str, n_classes: int, out_dims: int, n_queries: int | str = 0) -> tuple[OutputSpec, ...]:
    """The outputs a head of ``task`` contributes to the graph; ``n_queries`` is a detector's query
    count, or "nodes" for a node-anchored one (one query per node)."""
    if task == "classify":
        return (OutputSpec("logits", "class_logits", task, "logits", (n_classes,)),)
    if task in ("localize", "quake"):
        name = "position" if task == "localize" else "hypocentre"
        return (OutputSpec(name, "regression", task, "position", (out_dims,)),)
    if task == "detect":
        return (OutputSpec("detection_logits", "raw", task, "logits", (n_queries, n_classes + 1)),
                OutputSpec("detection_positions", "raw", task, "positions", (n_queries, out_dims)))
    raise ValueError(f"unknown task {task!r}")


class DeployModel(nn.Module):
    """encoder + heads -> tuple of outputs in ``self.outputs`` order.

    forward(*inputs) takes ``input_names`` in order: for each modality tokens then presence, then
    positions and node_index (node_text for SPAR+LLM encoders).
    """

    def __init__(self, encoder: SparEncoder, heads: dict[str, nn.Module], n_classes: int, out_dims: int):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.modalities = encoder.modality_names
        specs: list[OutputSpec] = []
        for task, head in heads.items():
            specs += output_specs(task, n_classes, out_dims, getattr(head, "n_queries", 0))
        self.outputs = tuple(specs)

    @property
    def input_names(self) -> tuple[str, ...]:
        names = []
        for m in self.modalities:
            names += [tokens_input(m), present_input(m)]
        return (*names, POSITIONS_INPUT, self.structure_input)

    @property
    def structure_input(self) -> str:
        """The input that tells nodes apart structurally: node_index, or node_text for SPAR+LLM."""
        return NODE_TEXT_INPUT if self.encoder.cfg.structural_source == "text" else NODE_INDEX_INPUT

    def example_structure(self, batch: int, nodes: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A plausible structure input: node_index 0..N-1 (modulo the table size) [B, N], or for
        SPAR+LLM random unit description embeddings [B, N, E]."""
        cfg = self.encoder.cfg
        if self.structure_input == NODE_TEXT_INPUT:
            text = torch.randn(nodes, cfg.text_dims, generator=generator)
            return (text / text.norm(dim=-1, keepdim=True)).expand(batch, -1, -1).contiguous()
        return torch.arange(nodes).remainder(cfg.max_nodes).expand(batch, -1).contiguous()

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """inputs in ``input_names`` order -> outputs in ``output_names`` order."""
        k = len(self.modalities)
        tokens = {m: inputs[2 * i] for i, m in enumerate(self.modalities)}
        present = {m: inputs[2 * i + 1] for i, m in enumerate(self.modalities)}
        positions, structure = inputs[2 * k], inputs[2 * k + 1]
        text = self.structure_input == NODE_TEXT_INPUT
        node_index = positions.new_zeros(()) if text else structure
        batch = Batch(tokens, present, positions, node_index, label=positions.new_zeros(()),
                      target_class=positions.new_zeros(()), target_position=positions.new_zeros(()),
                      node_text=structure if text else None)
        features = self.encoder.forward_features(batch)
        results = []
        for task, head in self.heads.items():
            raw = run_head(head, features.latents, features.valid, features.positions)
            for spec in self.outputs:
                if spec.task != task:
                    continue
                value = raw[spec.key] if isinstance(raw, dict) else raw
                if spec.kind == "regression" or spec.key == "positions":
                    value = features.frame.denormalize(value)  # metres, not normalised units
                results.append(value)
        return tuple(results)

    def inputs_from_batch(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """A Batch as the flat input tuple of ``forward``."""
        flat = []
        for m in self.modalities:
            flat += [batch.tokens[m], batch.present[m]]
        if self.structure_input == NODE_TEXT_INPUT:
            if batch.node_text is None:
                raise ValueError("a SPAR+LLM model needs batch.node_text")
            return (*flat, batch.positions, batch.node_text.contiguous())
        return (*flat, batch.positions, batch.node_index)

    def named_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, self.inputs_from_batch(batch), strict=True))


def deploy_model_from_checkpoints(paths: list[str]) -> tuple[DeployModel, list[dict]]:
    """One DeployModel from fine-tune checkpoints that share one encoder (e.g. a classifier and a
    localizer trained on the same frozen encoder). Refuses checkpoints whose encoders differ."""
    from train.errors import TrainError
    from train.finetune import load_task_model

    if not paths:
        raise TrainError("give at least one fine-tuned checkpoint")
    models, ckpts = zip(*(load_task_model(p) for p in paths), strict=True)
    first = models[0].encoder.state_dict()
    for path, model in zip(paths[1:], models[1:], strict=True):
        other = model.encoder.state_dict()
        if first.keys() != other.keys() or any(not torch.equal(first[k], other[k]) for k in first):
            raise TrainError(f"{path} was fine-tuned on another encoder than {paths[0]}; heads of one "
                             "deployed model must share the frozen encoder")
    tasks = [m.task for m in models]
    if len(set(tasks)) != len(tasks):
        raise TrainError(f"two checkpoints have the same task ({', '.join(tasks)})")
    extra = ckpts[0]["extra"]
    model = DeployModel(models[0].encoder, {m.task: m.head for m in models}, extra["n_classes"], extra["out_dims"])
    return model.eval(), list(ckpts)
