"""The supervised objective: the encoder learns from labels through a task head, no masking.

It is the "no self-supervision" baseline of the objectives benchmark: the same backbone trained
end to end on the labelled windows of the pretraining set, then frozen under a fresh head like
every other objective's encoder. The pretraining loop fills ``task``, ``n_classes`` and
``out_dims`` of ``cfg.objective_params`` from the dataset (train.pretrain.objective_defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from train.batch import Batch
from train.heads import make_head, run_head
from train.models.config import SparConfig
from train.models.spar import SparEncoder

TASKS = ("classify", "localize")


@dataclass(frozen=True)
class SupervisedParams:
    task: str = "classify"  # classify: window labels; localize: first target's position
    n_classes: int = 2
    out_dims: int = 2

    @classmethod
    def from_dict(cls, data: dict) -> SupervisedParams:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown supervised objective params: {', '.join(unknown)}")
        params = cls(**data)
        if params.task not in TASKS:
            raise ValueError(f"supervised task must be one of {', '.join(TASKS)}, got {params.task!r}")
        return params


@dataclass
class NoNoise:
    """The supervised objective draws nothing; this keeps the loop's noise protocol."""

    def slice(self, start: int, stop: int) -> NoNoise:
        return self

    def to(self, device) -> NoNoise:
        return self


@dataclass
class SupervisedOutput:
    loss: torch.Tensor

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        return {"task": self.loss.detach()}


class SupervisedPretrainer(nn.Module):
    """SparEncoder + a task head (train.heads) trained on labels; only the encoder is kept."""

    def __init__(self, cfg: SparConfig):
        super().__init__()
        self.cfg = cfg
        self.params = SupervisedParams.from_dict(cfg.objective_params)
        self.encoder = SparEncoder(cfg)
        self.head = make_head(self.params.task, cfg.dim, self.params.n_classes, self.params.out_dims)

    def start_step(self, step: int, total_steps: int) -> None:
        """No schedule of its own."""

    def draw_noise(self, batch_size: int, n_nodes: int, generator: torch.Generator | None = None) -> NoNoise:
        return NoNoise()

    def forward(self, batch: Batch, noise: NoNoise | None = None) -> SupervisedOutput:
        """The head's loss on the batch's labels (cross entropy, or MSE of the normalised position)."""
        features = self.encoder.forward_features(batch)
        outputs = run_head(self.head, features.latents, features.valid, features.positions)
        return SupervisedOutput(self.head.loss(outputs, batch, features.frame))
