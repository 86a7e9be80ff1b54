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
    torch.manual_seed(0)
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


def tables(enc):
    return {k: e.structural_table.weight.detach().clone() for k, e in enc.embeddings.items()}


def test_nearest_writes_each_nodes_chosen_vector_into_its_own_row(tiny_window_set):
    enc = encoder()
    before = tables(enc)
    windows = windows_at(tiny_window_set, [[9.0, 1.0], [1.0, 8.0], [0.5, 0.5], [11.0, -1.0]])
    assign_structural_slots(enc, PRETRAIN_SITE, windows, "nearest")
    assert enc.cfg.max_nodes == 4  # grown: the new layout has more nodes than the table had rows
    for name, table in tables(enc).items():
        torch.testing.assert_close(table, before[name][[1, 2, 0, 1]])
    # the model of the new site feeds node i as slot i, like any other model
    assert windows.batch([0]).node_index.tolist() == [[0, 1, 2, 3]]


def test_random_slots_are_learned_rows_and_seeded(tiny_window_set):
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0]])
    a, b = encoder(), encoder()
    before = tables(a)
    assign_structural_slots(a, PRETRAIN_SITE, windows, "random", seed=3)
    assign_structural_slots(b, PRETRAIN_SITE, windows, "random", seed=3)
    for name, table in tables(a).items():
        assert all(any(torch.equal(row, learned) for learned in before[name]) for row in table[:2])
        torch.testing.assert_close(table, tables(b)[name])


def test_mean_policy_gives_every_node_the_mean_learned_vector(tiny_window_set):
    enc = encoder()
    before = tables(enc)
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    assign_structural_slots(enc, PRETRAIN_SITE, windows, "mean")
    for name, table in tables(enc).items():
        torch.testing.assert_close(table, before[name].mean(dim=0).expand(4, -1))


def test_the_rewritten_encoder_survives_a_checkpoint(tiny_window_set, tmp_path):
    from train.models.config import SparConfig as Config

    enc = encoder()
    assign_structural_slots(enc, PRETRAIN_SITE, windows_at(tiny_window_set, [[9.0, 1.0]] * 5), "nearest")
    rebuilt = SparEncoder(Config.from_dict(enc.cfg.to_dict()))
    rebuilt.load_state_dict(enc.state_dict())
    assert rebuilt.cfg.max_nodes == 5


def test_more_nodes_than_slots_needs_a_policy(tiny_window_set):
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    with pytest.raises(TrainError, match="use --slots nearest"):
        assign_structural_slots(encoder(), PRETRAIN_SITE, windows, "site")


def test_models_without_a_table_take_any_layout(tiny_window_set):
    windows = windows_at(tiny_window_set, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    for objective in ("spar_llm", "mae"):
        enc = encoder(objective)
        assign_structural_slots(enc, PRETRAIN_SITE, windows, "site")
        assert enc.cfg.max_nodes == 3
