"""Structural slots for a layout the encoder was not pretrained on (SPAR Table 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.errors import TrainError
from train.models.config import ModalitySpec, SparConfig, objective_config
from train.models.spar import SparEncoder
from train.unseen_layout import assign_structural_slots, nearest_slots

PRETRAIN_SITE = {"node_ids": ["a", "b", "c"], "positions": [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]}


def encoder(objective="spar", max_nodes=3):
    cfg = SparConfig(modalities=(ModalitySpec("m", 4, 3),), max_nodes=max_nodes, dim=8, heads=2, decoder_dim=8,
                     structural_dims=2)
    return SparEncoder(objective_config(cfg, objective))


def windows_at(tiny_window_set, positions):
    """The tiny windows re-placed on ``positions`` [N, 2] (only positions and node count matter here)."""
    n = len(positions)
    sub = tiny_window_set.subset(np.arange(4))
    sub.positions = np.broadcast_to(np.asarray(positions, np.float32), (4, n, 2)).copy()
    sub.tokens = {k: v[:, :n] for k, v in sub.tokens.items()}
    sub.present = {k: v[:, :n] for k, v in sub.present.items()}
    return sub


def test_nearest_slot_is_the_closest_pretraining_node():
    slots = nearest_slots(np.asarray(PRETRAIN_SITE["positions"]), np.array([[9.0, 1.0], [1.0, 8.0], [0.5, 0.5]]))
    assert slots.tolist() == [1, 2, 0]


def test_nearest_and_random_policies_set_slots_the_batches_use(tiny_window_set):
    windows = windows_at(tiny_window_set, [[9.0, 1.0], [1.0, 8.0], [0.5, 0.5], [11.0, -1.0]])
    assign_structural_slots(encoder(), PRETRAIN_SITE, windows, "nearest")
    assert windows.batch([0, 1]).node_index.tolist() == [[1, 2, 0, 1]] * 2
    assign_structural_slots(encoder(), PRETRAIN_SITE, windows, "random", seed=3)
    assert windows.node_slots.min() >= 0 and windows.node_slots.max() < 3


def test_mean_policy_gives_every_node_the_mean_learned_vector(tiny_window_set):
    enc = encoder()
    tables = {k: e.structural_table.weight.detach().clone() for k, e in enc.embeddings.items()}
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    assign_structural_slots(enc, PRETRAIN_SITE, windows, "mean")
    for name, e in enc.embeddings.items():
        torch.testing.assert_close(e.structural_table.weight[0], tables[name].mean(dim=0))
    assert windows.node_slots.tolist() == [0, 0, 0, 0]


def test_more_nodes_than_slots_needs_a_policy(tiny_window_set):
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    with pytest.raises(TrainError, match="use --slots nearest"):
        assign_structural_slots(encoder(), PRETRAIN_SITE, windows, "site")


def test_models_without_a_table_ignore_the_policy(tiny_window_set):
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0]])
    assign_structural_slots(encoder("spar_llm"), PRETRAIN_SITE, windows, "nearest")
    assert windows.node_slots is None
