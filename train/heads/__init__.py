"""Task heads trained on the frozen SPAR encoder, and the registry the fine-tuning loop uses.

Every head follows the protocol of ``train.heads.blocks.Head``:

    outputs = head(latents [B, L, d], valid [B, L] bool)   # Tensor or dict of Tensors
    loss = head.loss(outputs, batch, frame)                 # scalar, differentiable
    arrays = head.predict(outputs, frame)                   # numpy, metres / class ids

Localization outputs are in the per-sample normalised units of ``PositionFrame``;
``predict`` converts them to metres so ``train.metrics.summarize(task, ...)`` can score them.
"""

from __future__ import annotations

from train.heads.blocks import (
    DecoderBlock,
    Head,
    MaskedMultiheadAttention,
    TransformerBlock,
    masked_mean,
    run_head,
)
from train.heads.classifier import LinearClassifier
from train.heads.detector import DetrDetector
from train.heads.localizer import TransformerLocalizer
from train.heads.quake import QuakeLocalizer

HEADS: dict[str, type[Head]] = {
    "classify": LinearClassifier,
    "localize": TransformerLocalizer,
    "detect": DetrDetector,
    "quake": QuakeLocalizer,
}


# Alternative heads, chosen with ``spar-train finetune --head NAME``: name -> (task, "module:Class").
# Their constructor kwargs depend on the data (token layout, floor plan) and are stored in the
# fine-tune checkpoint, so a checkpoint rebuilds its head alone.
HEAD_VARIANTS: dict[str, tuple[str, str]] = {
    "fusion": ("classify", "train.heads.multiscale_fusion:MultiScaleFusionClassifier"),  # RobustHAR
    "map": ("localize", "train.heads.map_localizer:MapAwareLocalizer"),  # AEMP
    # One DETR query per node, anchored at it: detections as offsets from the nodes.
    "anchors": ("detect", "train.heads.anchor_detector:NodeAnchorDetector"),
    # SPAR's classification head: the localizer's one transformer block, then a linear readout.
    "transformer": ("classify", "train.heads.classifier:TransformerClassifier"),
}


def make_head_variant(name: str, d: int, n_classes: int, out_dims: int, **kwargs) -> Head:
    """Head ``name`` of HEAD_VARIANTS with its data-dependent ``kwargs``."""
    import importlib

    if name not in HEAD_VARIANTS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(HEAD_VARIANTS)}")
    task, target = HEAD_VARIANTS[name]
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if task in ("classify", "detect"):
        return cls(d, n_classes, **({"out_dims": out_dims} if task == "detect" else {}), **kwargs)
    return cls(d, out_dims=out_dims, **kwargs)


def make_head(task: str, d: int, n_classes: int, out_dims: int, **kwargs) -> Head:
    """The head for ``task`` on latents of width ``d``.

    n_classes: window classes (classify, detect; ignored otherwise).
    out_dims: position dims predicted (localize, detect, quake; ignored for classify).
    kwargs: passed to the head's constructor (e.g. n_queries, layers, heads).
    """
    if task not in HEADS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(HEADS))}")
    if task == "classify":
        return LinearClassifier(d, n_classes, **kwargs)
    if task == "detect":
        return DetrDetector(d, n_classes, out_dims=out_dims, **kwargs)
    return HEADS[task](d, out_dims=out_dims, **kwargs)


__all__ = ["HEADS", "HEAD_VARIANTS", "DecoderBlock", "DetrDetector", "Head", "LinearClassifier",
           "MaskedMultiheadAttention", "QuakeLocalizer", "TransformerBlock", "TransformerLocalizer", "make_head",
           "make_head_variant", "masked_mean", "run_head"]
