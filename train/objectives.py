"""Pretraining objectives: which pretrainer module trains the shared encoder, by objective name.

Every objective trains the same ``SparEncoder`` (so heads, export and the aggregator never need to
know which one did), and every pretrainer follows one protocol, the one ``SparPretrainer`` set:

    model = PretrainerClass(cfg: SparConfig)       # cfg.objective_params: the objective's own knobs
    model.encoder                                  # the SparEncoder that ships
    noise = model.draw_noise(B, N, generator)      # all randomness of a step; .slice(a, b), .to(device)
    model.start_step(step, total_steps)            # called before each training step (schedules)
    out = model(batch, noise)                      # out.loss scalar; out.parts: name -> detached scalar

Drawing the noise for the whole global batch outside the model keeps DDP runs identical to one
process (see train.pretrain). Classes load on first use so one objective's code never slows another.
"""

from __future__ import annotations

import importlib

from torch import nn

from train.models.config import ABLATIONS, OBJECTIVES, SparConfig

# objective -> "module:Class"; the ablations of SPAR's Table 8 are SPAR with switches flipped.
PRETRAINERS: dict[str, str] = {
    **{name: "train.models.spar:SparPretrainer" for name in (*OBJECTIVES, *ABLATIONS)},
    "robusthar": "train.models.robusthar:RobustHarPretrainer",
    "aemp": "train.models.aemp:AempPretrainer",
    "supervised": "train.models.supervised:SupervisedPretrainer",
}


def objective_names() -> tuple[str, ...]:
    """Every name ``spar-train pretrain --objective`` accepts."""
    return tuple(PRETRAINERS)


def build_pretrainer(cfg: SparConfig) -> nn.Module:
    """The pretrainer of ``cfg.objective``; ValueError for an unknown objective or bad params."""
    if cfg.objective not in PRETRAINERS:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(PRETRAINERS)}")
    module_name, class_name = PRETRAINERS[cfg.objective].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg)
