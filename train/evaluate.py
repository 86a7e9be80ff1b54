"""`spar-train eval`: metrics of a fine-tuned checkpoint, optionally under simulated node loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.data import drop_nodes, load_windows, temporal_split
from train.distributed import pick_device
from train.errors import TrainError
from train.finetune import check_compatible, evaluate, load_task_model, task_indices


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, split: str = "val", val_fraction: float = 0.25,
                        drop_rate: float = 0.0, batch_size: int = 64, seed: int = 0,
                        device: str = "auto") -> dict[str, float]:
    """Task metrics on the validation windows (``split="val"``) or all windows of ``data``.

    ``drop_rate``: each node's data of each window is dropped with this probability (seeded), the
    paper's lossy-communication test.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise TrainError(f"drop_rate must be in [0, 1), got {drop_rate}")
    dev = pick_device(device)
    model, ckpt = load_task_model(checkpoint)
    windows = load_windows(data, progress=False)
    check_compatible(ckpt["data"], windows, str(checkpoint))
    if split == "val":
        indices = temporal_split(len(windows), val_fraction)[1]
    else:
        indices = np.arange(len(windows))
    indices = task_indices(windows, model.task, indices)
    generator = torch.Generator().manual_seed(seed)
    transform = (lambda batch: drop_nodes(batch, drop_rate, generator)) if drop_rate > 0 else None
    metrics = evaluate(model.to(dev), windows, indices, batch_size, dev, transform)
    return {"windows": int(len(indices)), **metrics}
