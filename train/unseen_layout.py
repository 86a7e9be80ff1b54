"""Structural positions for a layout the encoder was not pretrained on (SPAR Table 7).

A learnable structural table has one row per node slot of the pretraining site. A new site's nodes
have no rows of their own, so each gets one of the learned vectors: the slot of the nearest
pretraining node ("nearest", what the aggregator does for a node that joins live), the mean of all
rows ("mean"), or a random row ("random", the paper's protocol). SPAR+LLM needs none of this: its
structural vectors come from each node's description. MAE has no structural embedding at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from train.data import WindowSet
from train.errors import TrainError
from train.models.spar import SparEncoder


def assign_structural_slots(encoder: SparEncoder, pretrain_site: dict[str, Any], windows: WindowSet,
                            policy: str, seed: int = 0) -> None:
    """Make ``windows`` (and, for "mean", ``encoder``) use ``policy`` for their nodes' structural slots.

    Args:
        pretrain_site: the checkpoint's record of its pretraining site (node_ids, positions).
        windows: the new layout's windows; ``windows.node_slots`` [N] is set for nearest/random.
        policy: site | nearest | mean | random (train.run_config.SLOT_POLICIES).
    """
    table_rows = encoder.cfg.max_nodes
    if policy == "site" or not _has_table(encoder):
        if windows.n_nodes > table_rows:
            raise TrainError(f"the dataset has {windows.n_nodes} nodes, the encoder's structural table "
                             f"{table_rows} rows; use --slots nearest, mean or random for a new layout")
        windows.node_slots = None
        return
    learned = len(pretrain_site.get("node_ids") or []) or table_rows
    if policy == "nearest":
        windows.node_slots = nearest_slots(np.asarray(pretrain_site["positions"], dtype=np.float64),
                                           windows.positions[0].astype(np.float64))
    elif policy == "random":
        windows.node_slots = np.random.default_rng(seed).integers(0, learned, size=windows.n_nodes)
    elif policy == "mean":
        windows.node_slots = np.zeros(windows.n_nodes, dtype=np.int64)
        with torch.no_grad():
            for emb in encoder.embeddings.values():
                table = emb.structural_table.weight
                table.copy_(table[:learned].mean(dim=0, keepdim=True).expand_as(table))
    else:
        raise TrainError(f"unknown slot policy {policy!r}")


def nearest_slots(pretrain_positions: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[N] int64: for each of ``positions`` [N, d] the index of the nearest of ``pretrain_positions`` [M, d]."""
    distances = np.linalg.norm(positions[:, None, :] - pretrain_positions[None, :, :], axis=-1)
    return distances.argmin(axis=1).astype(np.int64)


def _has_table(encoder: SparEncoder) -> bool:
    return any(emb.structural_table is not None for emb in encoder.embeddings.values())
