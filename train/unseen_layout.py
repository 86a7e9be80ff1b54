"""Structural positions for a layout the encoder was not pretrained on (SPAR Table 7).

A learnable structural table has one row per node slot of the pretraining site. A new site's nodes
have no rows of their own, so each gets one of the learned vectors (copied into its own row): the slot of the nearest
pretraining node ("nearest", what the aggregator does for a node that joins live), the mean of all
rows ("mean"), or a random row ("random", the paper's protocol). SPAR+LLM needs none of this: its
structural vectors come from each node's description. MAE has no structural embedding at all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from train.data import WindowSet
from train.errors import TrainError
from train.models.spar import SparEncoder


def assign_structural_slots(encoder: SparEncoder, pretrain_site: dict[str, Any], windows: WindowSet,
                            policy: str, seed: int = 0) -> None:
    """Give the nodes of ``windows`` learned structural vectors by ``policy``, written into ``encoder``.

    The table is rewritten so that row i holds the vector chosen for node i of the new layout (and
    grown when the layout has more nodes than the table had rows). The fine-tuned checkpoint is then
    a model of the new site like any other: evaluation, export and the aggregator feed node i as
    slot i and get what fine-tuning saw.

    Args:
        pretrain_site: the checkpoint's record of its pretraining site (node_ids, positions).
        windows: the new layout's windows (node positions from its first window).
        policy: site | nearest | mean | random (train.run_config.SLOT_POLICIES).
    """
    if not _has_table(encoder):
        return  # SPAR+LLM (descriptions) and MAE (no structural embedding) need no slots
    rows = encoder.cfg.max_nodes
    if policy == "site":
        if windows.n_nodes > rows:
            raise TrainError(f"the dataset has {windows.n_nodes} nodes, the encoder's structural table "
                             f"{rows} rows; use --slots nearest, mean or random for a new layout")
        return
    learned = min(len(pretrain_site.get("node_ids") or []) or rows, rows)
    if policy == "nearest":
        chosen = nearest_slots(np.asarray(pretrain_site["positions"], dtype=np.float64)[:learned],
                               windows.positions[0].astype(np.float64))
    elif policy == "random":
        chosen = np.random.default_rng(seed).integers(0, learned, size=windows.n_nodes)
    elif policy == "mean":
        chosen = None
    else:
        raise TrainError(f"unknown slot policy {policy!r}")
    _rewrite_tables(encoder, chosen, learned, max(rows, windows.n_nodes))


def _rewrite_tables(encoder: SparEncoder, chosen: np.ndarray | None, learned: int, rows: int) -> None:
    """Row i of every structural table := learned row chosen[i] (all rows: the mean when chosen is
    None); rows beyond the new layout's nodes get the mean too."""
    with torch.no_grad():
        for emb in encoder.embeddings.values():
            old = emb.structural_table.weight
            mean = old[:learned].mean(dim=0)
            new = mean.expand(rows, -1).clone()
            if chosen is not None:
                new[:len(chosen)] = old[torch.as_tensor(chosen, dtype=torch.long)]
            emb.structural_table = torch.nn.Embedding.from_pretrained(new, freeze=False)
    encoder.cfg = replace(encoder.cfg, max_nodes=rows)


def nearest_slots(pretrain_positions: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[N] int64: for each of ``positions`` [N, d] the index of the nearest of ``pretrain_positions`` [M, d]."""
    distances = np.linalg.norm(positions[:, None, :] - pretrain_positions[None, :, :], axis=-1)
    return distances.argmin(axis=1).astype(np.int64)


def _has_table(encoder: SparEncoder) -> bool:
    return any(emb.structural_table is not None for emb in encoder.embeddings.values())
