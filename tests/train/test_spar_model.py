"""SPAR model: shapes, masking invariants, missing nodes, position frames, the ablation switches."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from train.batch import Batch
from train.models.config import ABLATIONS, ModalitySpec, SparConfig, objective_config
from train.models.masking import mask_tokens
from train.models.positions import apply_rigid_motion, normalize_positions, random_rigid_motion
from train.models.spar import SparPretrainer

MODALITIES = (ModalitySpec("microphone", 8, 12), ModalitySpec("geophone", 4, 6))
CFG = SparConfig(modalities=MODALITIES, max_nodes=5, dim=16, heads=2, decoder_dim=8, modality_depth=1,
                 joint_depth=1, structural_dims=3)


def make_batch(b=4, n=5, seed=0, missing=()) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = {s.name: torch.randn(b, n, s.n_tokens, s.token_dim, generator=g) * 5 - 50 for s in MODALITIES}
    present = {s.name: torch.ones(b, n, dtype=torch.bool) for s in MODALITIES}
    for sample, node in missing:
        for name in present:
            present[name][sample, node] = False
            tokens[name][sample, node] = 0.0
    return Batch(tokens, present, torch.rand(b, n, 2, generator=g) * 40, torch.arange(n).repeat(b, 1),
                 torch.zeros(b, dtype=torch.long), torch.full((b, 1), -1), torch.full((b, 1, 2), float("nan")))


def noise_for(model, b=4, n=5, seed=1):
    return model.draw_noise(b, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["random", "node_balanced"])
def test_exactly_the_configured_fraction_is_masked(strategy):
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(3, 10 * 8, dtype=torch.bool)
    valid[1, 16:32] = False  # two nodes of sample 1 sent nothing
    result = mask_tokens(valid, 8, strategy=strategy, ratio=0.75, token_noise=torch.rand(3, 80, generator=g),
                         node_noise=torch.rand(3, 10, generator=g), min_visible=2)
    for s in range(3):
        n_valid = int(valid[s].sum())
        assert int(result.masked[s].sum()) == n_valid - round(0.25 * n_valid)
        kept = result.keep_index[s][result.keep_valid[s]]
        assert len(kept) == round(0.25 * n_valid)
        assert bool(valid[s, kept].all()), "a missing token was made visible"
        assert not bool(result.masked[s, kept].any()), "a token is both visible and masked"
    assert not bool(result.masked[~valid].any()), "missing tokens must never be reconstruction targets"


def test_node_balanced_keeps_at_least_k_tokens_per_present_node():
    valid = torch.ones(50, 6 * 16, dtype=torch.bool)
    valid[:, 32:48] = False
    g = torch.Generator().manual_seed(3)
    result = mask_tokens(valid, 16, strategy="node_balanced", ratio=0.75, token_noise=torch.rand(50, 96, generator=g),
                         node_noise=torch.rand(50, 6, generator=g), min_visible=3)
    visible = valid & ~result.masked  # [B, L]
    per_node = visible.reshape(50, 6, 16).sum(-1)
    present = valid.reshape(50, 6, 16).any(-1)
    assert int(per_node[present].min()) >= 3
    assert int(per_node[~present].max()) == 0
    # plain random masking does starve some nodes with the same noise: the option matters
    plain = mask_tokens(valid, 16, strategy="random", ratio=0.75, token_noise=torch.rand(50, 96, generator=g),
                        node_noise=torch.rand(50, 6, generator=g))
    assert int(((valid & ~plain.masked).reshape(50, 6, 16).sum(-1))[present].min()) < 3


def test_node_drop_masks_whole_nodes():
    valid = torch.ones(20, 8 * 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    result = mask_tokens(valid, 4, strategy="node_drop", ratio=0.75, token_noise=torch.rand(20, 32, generator=g),
                         node_noise=torch.rand(20, 8, generator=g))
    per_node = result.masked.reshape(20, 8, 4).sum(-1)
    assert set(per_node.unique().tolist()) <= {0, 4}, "a node was partly masked"
    assert (per_node == 0).sum(-1).tolist() == [2] * 20  # round(0.25 * 8) nodes stay visible


def test_pretrainer_shapes_and_features():
    model = SparPretrainer(CFG)
    batch = make_batch()
    out = model(batch, noise_for(model))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.masks["microphone"].masked.shape == (4, 5 * 8)
    features = model.encoder.forward_features(batch)
    assert features.latents.shape == (4, 5 * 8 + 5 * 4, 16)
    assert features.valid.all()
    assert features.spans == {"microphone": (0, 40), "geophone": (40, 60)}


def test_missing_nodes_never_contribute_to_the_loss():
    model = SparPretrainer(CFG)
    noise = noise_for(model)
    batch = make_batch(missing=[(0, 1), (2, 4)])
    loss = model(batch, noise).loss
    # whatever garbage sits in a missing node's tokens, the loss is unchanged ...
    for name in batch.tokens:
        batch.tokens[name][0, 1] = 1e6
        batch.tokens[name][2, 4] = -1e6
    assert torch.allclose(model(batch, noise).loss, loss)
    # ... and no gradient reaches those tokens
    tokens = batch.tokens["microphone"].clone().requires_grad_(True)
    batch.tokens["microphone"] = tokens
    model(batch, noise).loss.backward()
    assert tokens.grad[0, 1].abs().max() == 0 and tokens.grad[2, 4].abs().max() == 0
    assert tokens.grad[0, 0].abs().max() > 0


def test_a_window_with_every_node_missing_stays_finite():
    model = SparPretrainer(CFG)
    batch = make_batch(missing=[(1, i) for i in range(5)])
    out = model(batch, noise_for(model))
    assert torch.isfinite(out.loss)
    features = model.encoder.forward_features(batch)
    assert torch.isfinite(features.latents).all()
    assert not features.valid[1].any()


def test_normalisation_keeps_relative_geometry():
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(6, 7, 2, generator=g) * 100 + 5000
    normalised, frame = normalize_positions(positions)
    assert torch.allclose(normalised.mean(dim=1), torch.zeros(6, 2), atol=1e-4)
    assert torch.allclose((normalised ** 2).sum(-1).mean(-1), torch.ones(6), atol=1e-4)
    # distance ratios (shape) are unchanged, and the frame maps back to metres
    d_before = torch.cdist(positions, positions)
    d_after = torch.cdist(normalised, normalised)
    assert torch.allclose(d_after * frame.scale[:, None, None], d_before, atol=1e-2)
    assert torch.allclose(frame.denormalize(normalised), positions, atol=1e-2)


def test_rotation_and_translation_keep_relative_geometry():
    g = torch.Generator().manual_seed(1)
    for dims in (2, 3):
        points = torch.randn(8, 6, dims, generator=g)
        rotation, translation = random_rigid_motion(8, dims, generator=g)
        moved = apply_rigid_motion(points, rotation, translation)
        assert torch.allclose(torch.cdist(moved, moved), torch.cdist(points, points), atol=1e-5)
        assert torch.allclose(torch.linalg.det(rotation), torch.ones(8), atol=1e-5)
        assert not torch.allclose(moved, points)
    # 3-D layouts turn about the vertical axis only: heights are kept
    points = torch.randn(4, 5, 3, generator=g)
    rotation, translation = random_rigid_motion(4, 3, generator=g)
    assert torch.allclose(apply_rigid_motion(points, rotation, translation)[..., 2], points[..., 2])


def test_switches_remove_their_components():
    mae = SparPretrainer(objective_config(CFG, "mae"))
    assert mae.encoder.embeddings["microphone"].spatial is None
    assert mae.encoder.embeddings["microphone"].structural is None
    assert len(mae.spatial_decoders) == 0
    out = mae(make_batch(), noise_for(mae))
    assert float(out.spatial_loss) == 0.0
    # MAE cannot tell nodes apart: moving signals to other nodes' places just permutes its latents
    batch = make_batch()
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = Batch({k: v[:, perm] for k, v in batch.tokens.items()},
                     {k: v[:, perm] for k, v in batch.present.items()},
                     batch.positions, batch.node_index, batch.label, batch.target_class, batch.target_position)
    a = mae.encoder.forward_features(batch).latents[:, :40].reshape(4, 5, 8, 16)
    b = mae.encoder.forward_features(permuted).latents[:, :40].reshape(4, 5, 8, 16)
    assert torch.allclose(a[:, perm], b, atol=1e-5)
    spar = SparPretrainer(CFG)
    a = spar.encoder.forward_features(batch).latents[:, :40].reshape(4, 5, 8, 16)
    b = spar.encoder.forward_features(permuted).latents[:, :40].reshape(4, 5, 8, 16)
    assert not torch.allclose(a[:, perm], b, atol=1e-3), "SPAR must know where a signal was sensed"


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_trains_one_step(name):
    model = SparPretrainer(objective_config(CFG, name))
    out = model(make_batch(), noise_for(model))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_geometric_augmentation_changes_only_the_spatial_targets():
    cfg = replace(CFG, geometric_augmentation=True)
    model = SparPretrainer(cfg)
    batch = make_batch()
    noise = noise_for(model)
    positions = model.prepare_positions(batch.positions, noise)
    plain, _ = normalize_positions(batch.positions)
    assert not torch.allclose(positions, plain)
    assert torch.allclose(torch.cdist(positions, positions), torch.cdist(plain, plain), atol=1e-5)


def test_config_round_trips_and_rejects_unknown_keys():
    data = CFG.to_dict()
    assert SparConfig.from_dict(data) == CFG
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        SparConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ValueError, match="masking"):
        replace(CFG, masking="sometimes")
    with pytest.raises(ValueError, match="unknown objective"):
        objective_config(CFG, "bert")


def test_same_noise_same_loss_whatever_the_batch_split():
    """The DDP contract at model level: slices of a global batch's noise give the same per-sample
    losses as the whole batch."""
    model = SparPretrainer(CFG)
    batch = make_batch(b=6)
    noise = model.draw_noise(6, 5, torch.Generator().manual_seed(9))
    whole = float(model(batch, noise).loss.detach())
    halves = [float(model(batch.slice(i, i + 3), noise.slice(i, i + 3)).loss.detach()) for i in (0, 3)]
    assert np.isclose(whole, np.mean(halves), rtol=1e-5)


def test_token_merge_embeds_adjacent_patches_of_one_node_as_one_token():
    """token_merge k: N * m / k tokens per modality; merged token j of a node sees exactly its k patches."""
    from train.models.spar import SparEncoder

    torch.manual_seed(0)
    encoder = SparEncoder(replace(CFG, token_merge=4)).eval()
    batch = make_batch(b=2, missing=[(1, 3)])
    features = encoder.forward_features(batch)
    assert features.latents.shape == (2, 5 * 2 + 5 * 1, 16)
    assert features.spans == {"microphone": (0, 10), "geophone": (10, 15)}
    assert features.valid[1].tolist() == [True] * 6 + [False] * 2 + [True] * 2 + [True] * 3 + [False, True]
    emb = encoder.embeddings["microphone"]
    tokens = emb.normalize_tokens(batch.tokens["microphone"], batch.present["microphone"])
    before = emb(tokens, batch.present["microphone"], batch.positions, batch.node_index).signal
    tokens[0, 2, 5] += 1.0  # patch 5 of node 2 belongs to node 2's second merged token (patches 4-7) only
    after = emb(tokens, batch.present["microphone"], batch.positions, batch.node_index).signal
    changed = (after - before).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [2 * 2 + 1]


def test_token_merge_must_divide_every_modality_and_is_refused_for_pretraining():
    with pytest.raises(ValueError, match="does not divide the 4 tokens of modality geophone"):
        replace(CFG, token_merge=8)
    with pytest.raises(ValueError, match="token_merge must be"):
        replace(CFG, token_merge=0)
    with pytest.raises(ValueError, match="pretraining needs token_merge 1"):
        SparPretrainer(replace(CFG, token_merge=2))
    assert SparConfig.from_dict(replace(CFG, token_merge=2).to_dict()).token_merge == 2
