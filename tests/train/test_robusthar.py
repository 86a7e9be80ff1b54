"""RobustHAR: multi-scale masks, the Eq. 5-7 loss, the objective in the pretraining loop, and the
adaptive multi-scale fusion head (shapes, absent nodes, ONNX parity)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from train.batch import Batch
from train.heads.multiscale_fusion import MultiScaleFusionClassifier, layout_of, segment_maps
from train.models.config import ModalitySpec, SparConfig, objective_config
from train.models.multiscale_masking import channel_masks, choose_units, segment_masks, sensor_masks
from train.models.robusthar import (
    RobustHarParams,
    RobustHarPretrainer,
    completed_views,
    consistency_loss,
    l1_reconstruction,
)
from train.objectives import build_pretrainer
from train.pretrain import run_pretrain
from train.run_config import PretrainConfig

# body_har in miniature: 6 nodes, acc and gyro on 4 x 4 grids, mag on 2 x 4 (other rows, same columns)
N = 6
MODALITIES = (ModalitySpec("acc", 16, 6, patch_grid=(4, 4)), ModalitySpec("gyro", 16, 6, patch_grid=(4, 4)),
              ModalitySpec("mag", 8, 6, patch_grid=(2, 4)))
GRIDS = {s.name: s.grid for s in MODALITIES}
CFG = objective_config(SparConfig(modalities=MODALITIES, max_nodes=N, position_dims=3, dim=16, heads=2,
                                  decoder_dim=8, modality_depth=1, joint_depth=1, structural_dims=3), "robusthar")
TINY_MODEL = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


def make_batch(b=4, seed=0, missing=()) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = {s.name: torch.randn(b, N, s.n_tokens, s.token_dim, generator=g) for s in MODALITIES}
    present = {s.name: torch.ones(b, N, dtype=torch.bool) for s in MODALITIES}
    for sample, node in missing:
        for name in present:
            present[name][sample, node] = False
            tokens[name][sample, node] = 0.0
    return Batch(tokens, present, torch.rand(b, N, 3, generator=g), torch.arange(N).repeat(b, 1),
                 torch.arange(b) % 3, torch.full((b, 1), -1), torch.full((b, 1, 3), float("nan")))


def model_with(**params) -> RobustHarPretrainer:
    torch.manual_seed(0)
    return RobustHarPretrainer(replace(CFG, objective_params=params))


def valid_of(batch: Batch) -> dict[str, torch.Tensor]:
    return {s.name: batch.present[s.name][:, :, None].expand(-1, -1, s.n_tokens).reshape(len(batch), -1)
            for s in MODALITIES}


def grid_view(mask: torch.Tensor, name: str) -> torch.Tensor:
    """[B, N * m] -> [B, N, rows, cols]."""
    return mask.reshape(mask.shape[0], N, *GRIDS[name])


MISSING = [(0, 1), (2, 4), (2, 5), (3, 0)]


# ------------------------------------------------------------------------------------------ masks

def test_segment_masks_hide_one_contiguous_span_per_node_across_rows_and_modalities():
    batch = make_batch(b=20, missing=MISSING)
    valid = valid_of(batch)
    masks = segment_masks(valid, GRIDS, 0.5, torch.rand(20, N, generator=torch.Generator().manual_seed(1)))
    spans = {}
    for name, result in masks.items():
        grid = grid_view(result.masked, name)  # [B, N, rows, cols]
        assert (grid == grid[:, :, :1]).all(), "a segment covers every frequency row"
        cols = grid[:, :, 0]  # [B, N, cols]
        present = batch.present[name]
        assert (cols.sum(-1)[present] == 2).all() and (cols.sum(-1)[~present] == 0).all()  # round(0.5 * 4)
        for row in cols[present]:
            hit = torch.nonzero(row).flatten()
            assert (hit.diff() == 1).all(), f"span not contiguous: {row.tolist()}"
        spans[name] = cols
    assert torch.equal(spans["acc"], spans["gyro"]) and torch.equal(spans["acc"], spans["mag"]), \
        "the modalities of a node lose the same time span"
    # at least one column always stays: a high ratio never turns into a sensor mask
    high = segment_masks(valid, GRIDS, 0.99, torch.rand(20, N))
    assert (grid_view(high["acc"].masked, "acc")[:, :, 0].sum(-1)[batch.present["acc"]] == 3).all()


@pytest.mark.parametrize("group", ["modality", "band"])
def test_channel_masks_hide_whole_channel_groups(group):
    batch = make_batch(b=20, missing=MISSING)
    sizes = {"acc": 4, "gyro": 4, "mag": 2} if group == "band" else dict.fromkeys(GRIDS, 1)
    g = torch.Generator().manual_seed(2)
    noise = {k: torch.rand(20, N, s, generator=g) for k, s in sizes.items()}
    masks = channel_masks(valid_of(batch), GRIDS, 0.5, group, noise)
    hidden_groups = 0
    for name, result in masks.items():
        grid = grid_view(result.masked, name)
        if group == "band":
            assert (grid == grid[..., :1]).all(), "a band covers all time columns of its row"
            hidden_groups = hidden_groups + grid[..., 0].sum(-1)
        else:
            assert (grid.flatten(2).all(-1) | ~grid.flatten(2).any(-1)).all(), "a modality is hidden whole"
            hidden_groups = hidden_groups + grid.flatten(2).all(-1)
    present = batch.present["acc"]
    expected = round(0.5 * sum(sizes.values()))  # groups per node: 3 modalities or 10 bands
    assert (hidden_groups[present] == expected).all() and (hidden_groups[~present] == 0).all()


def test_sensor_masks_hide_whole_nodes_in_every_modality():
    batch = make_batch(b=20, missing=MISSING)
    masks = sensor_masks(valid_of(batch), GRIDS, 0.5, torch.rand(20, N, generator=torch.Generator().manual_seed(3)))
    per_node = [grid_view(r.masked, k).flatten(2) for k, r in masks.items()]
    node_hidden = per_node[0].all(-1)
    for tokens in per_node:
        assert torch.equal(tokens.all(-1), node_hidden) and torch.equal(tokens.any(-1), node_hidden)
    present = batch.present["acc"].sum(-1)
    assert node_hidden.sum(-1).tolist() == [round(0.5 * int(p)) for p in present]  # 6 -> 3, 5 -> 2, 4 -> 2


def test_choose_units_keeps_one_present_unit_and_never_hides_absent_ones():
    present = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    noise = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.0, 0.0], [0.1, 0.2, 0.3]])
    assert choose_units(present, noise, 0.9).tolist() == [[False, True, False], [False] * 3, [False] * 3]
    assert choose_units(present, noise, 0.0).sum() == 0


def test_absent_nodes_are_never_masked_nor_visible_at_any_scale():
    model = model_with(channel_group="band")
    batch = make_batch(missing=MISSING)
    masks = model.mask(model.encoder.embed(batch, model.prepare_positions(batch.positions)),
                       model.draw_noise(4, N, torch.Generator().manual_seed(4)))
    assert set(masks) == {"segment", "channel", "sensor"}
    for scale, per_modality in masks.items():
        for name, result in per_modality.items():
            valid = valid_of(batch)[name]
            assert not result.masked[~valid].any(), f"{scale}: an absent token is a reconstruction target"
            for s in range(4):
                kept = result.keep_index[s][result.keep_valid[s]]
                assert valid[s, kept].all() and not result.masked[s, kept].any()
                assert len(kept) + int(result.masked[s].sum()) == int(valid[s].sum())


def test_masks_are_deterministic_and_slice_consistent():
    model = model_with()
    batch = make_batch(missing=MISSING)
    noise = model.draw_noise(4, N, torch.Generator().manual_seed(5))
    again = model.draw_noise(4, N, torch.Generator().manual_seed(5))

    def masks_of(b: Batch, n):
        return model.mask(model.encoder.embed(b, model.prepare_positions(b.positions)), n)

    whole, repeat, part = masks_of(batch, noise), masks_of(batch, again), masks_of(batch.slice(1, 3), noise.slice(1, 3))
    for scale in whole:
        for name in whole[scale]:
            assert torch.equal(whole[scale][name].masked, repeat[scale][name].masked)
            assert torch.equal(whole[scale][name].masked[1:3], part[scale][name].masked)
            for s in (1, 2):
                w, p = whole[scale][name], part[scale][name]
                assert torch.equal(w.keep_index[s][w.keep_valid[s]], p.keep_index[s - 1][p.keep_valid[s - 1]])


# ------------------------------------------------------------------------------------------- loss

def test_l1_reconstruction_by_hand():
    prediction = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [4.0, 7.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    masked = torch.tensor([[True, False, True], [False, False, False]])
    # sample 0: tokens 0 and 2: (|1| + |2|) / 2 = 1.5, (1 + 2) / 2 = 1.5 -> 1.5; sample 1: nothing -> 0
    assert float(l1_reconstruction(prediction, target, masked)) == pytest.approx((1.5 + 0.0) / 2)


def test_consistency_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    assert float(consistency_loss(torch.stack([a, a, 3 * a]))) == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # sample 0 orthogonal (1 - 0), sample 1 identical (0)
    assert float(consistency_loss(torch.stack([a, b]))) == pytest.approx(0.5)
    # three views: pairs (a, b), (a, a), (b, a) -> 0.5 + 0 + 0.5
    assert float(consistency_loss(torch.stack([a, b, a]))) == pytest.approx(1.0)
    assert float(consistency_loss(a[None])) == 0.0


def test_completed_views_replace_only_masked_tokens():
    target = {"x": torch.zeros(1, 2, 2)}
    prediction = {"x": torch.ones(1, 2, 2)}
    out = completed_views(target, prediction, {"x": torch.tensor([[False, True]])})
    assert out.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_loss_is_the_lambda_blend_of_reconstruction_and_consistency():
    batch = make_batch(missing=MISSING)
    for space in ("latent", "completed"):
        for lam in (0.2, 1.0):
            model = model_with(balance=lam, consistency_space=space, consistency_dim=8 if space == "latent" else 0)
            out = model(batch, model.draw_noise(4, N, torch.Generator().manual_seed(6)))
            parts = out.parts
            assert set(parts) == {"rec", "con", "rec_segment", "rec_channel", "rec_sensor"}
            assert float(parts["rec"]) == pytest.approx(sum(float(parts[f"rec_{s}"]) for s in
                                                            ("segment", "channel", "sensor")), rel=1e-6)
            assert float(parts["con"]) > 0 and float(parts["rec"]) > 0
            expected = lam * float(parts["rec"]) + (1 - lam) * float(parts["con"])
            assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_unmasked_views_are_identical_so_both_terms_vanish():
    model = model_with(segment_ratio=0.0, channel_ratio=0.0, sensor_ratio=0.0)
    out = model(make_batch(), model.draw_noise(4, N, torch.Generator().manual_seed(7)))
    assert float(out.parts["rec"]) == 0.0
    assert float(out.parts["con"]) == pytest.approx(0.0, abs=1e-5)


def test_absent_nodes_do_not_change_the_loss():
    model = model_with()
    noise = model.draw_noise(4, N, torch.Generator().manual_seed(8))
    batch = make_batch(missing=MISSING)
    loss = model(batch, noise).loss
    for name in batch.tokens:
        batch.tokens[name][0, 1] = 1e6
    assert torch.allclose(model(batch, noise).loss, loss)


def test_same_noise_same_loss_whatever_the_batch_split():
    model = model_with()
    batch = make_batch(b=4, missing=MISSING)
    noise = model.draw_noise(4, N, torch.Generator().manual_seed(9))
    whole = float(model(batch, noise).loss.detach())
    halves = [float(model(batch.slice(i, i + 2), noise.slice(i, i + 2)).loss.detach()) for i in (0, 2)]
    assert np.isclose(whole, np.mean(halves), rtol=1e-5)


def test_a_few_steps_lower_the_loss():
    model = model_with(scales=["segment", "sensor"])
    batch = make_batch(missing=MISSING)
    for name, tokens in batch.tokens.items():  # every node sees the same signal: masked tokens are predictable
        tokens.copy_(tokens[:, 2:3] * batch.present[name][:, :, None, None])
    noise = model.draw_noise(4, N, torch.Generator().manual_seed(10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(batch, noise)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert set(out.rec) == {"segment", "sensor"}
    assert losses[-1] < 0.8 * losses[0], losses


def test_params_are_validated():
    assert RobustHarParams.from_dict({"scales": ["sensor"]}).scales == ("sensor",)
    for bad, match in [({"lambda": 0.5}, "unknown robusthar objective params: lambda"),
                       ({"balance": 1.5}, "balance"), ({"scales": ["segment", "time"]}, "scales"),
                       ({"scales": []}, "scales"), ({"sensor_ratio": 1.0}, "sensor_ratio"),
                       ({"channel_group": "axis"}, "channel_group"), ({"consistency_space": "x"}, "consistency_space")]:
        with pytest.raises(ValueError, match=match):
            build_pretrainer(replace(CFG, objective_params=bad))


def test_build_pretrainer_and_one_epoch_of_the_loop(tiny_parking_dataset, tmp_path):
    model = build_pretrainer(replace(CFG, objective_params={"balance": 0.7}))
    assert isinstance(model, RobustHarPretrainer) and model.params.balance == 0.7
    cfg = PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "rh"), objective="robusthar",
                         epochs=1, batch_size=8, lr=3e-3, progress=False,
                         model={**TINY_MODEL, "objective_params": {"channel_group": "band"}})
    result = run_pretrain(cfg)
    assert result.checkpoint.exists() and np.isfinite(result.train_loss) and np.isfinite(result.val_loss)


# ------------------------------------------------------------------------------------------- head

def head_case(b=3, seed=0):
    torch.manual_seed(seed)
    layout = layout_of(CFG, N)
    head = MultiScaleFusionClassifier(16, 5, layout, hidden=8)
    length = sum(n * r * c for _, n, r, c in layout)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, length, 16, generator=g)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[0, 16:32] = False  # node 1 of acc absent in window 0
    valid[0, 96 + 16:96 + 32] = False  # ... and of gyro
    valid[0, 192 + 8:192 + 16] = False  # ... and of mag
    valid[2] = False  # a window where every node is missing
    return head, latents, valid


def test_layout_and_segments_follow_the_token_order():
    layout = layout_of(CFG, N)
    assert layout == [["acc", 6, 4, 4], ["gyro", 6, 4, 4], ["mag", 6, 2, 4]]
    # fewer columns in one modality: the others pool pairs of columns into its segments
    assert [m.tolist() for m in segment_maps([["a", 1, 1, 4], ["b", 1, 1, 2]])] == [
        [[1, 1, 0, 0], [0, 0, 1, 1]], [[1, 0], [0, 1]]]


def test_band_channels_pool_one_row_of_one_modality():
    head, latents, valid = head_case()
    band = MultiScaleFusionClassifier(16, 5, layout_of(CFG, N), channel_group="band", hidden=8)
    with torch.no_grad():
        band.project["channel"].weight.copy_(torch.eye(16))
        band.project["channel"].bias.zero_()
    features, group_valid = band.scale_features(latents[1:2], valid[1:2])["channel"]
    assert features.shape == (1, 10, 16) and group_valid.all()
    mag = latents[1, 192:240].reshape(6, 2, 4, 16)  # mag: 6 nodes x 2 rows x 4 cols
    torch.testing.assert_close(features[0, 9], mag[:, 1].mean(dim=(0, 1)))


def test_the_node_count_comes_from_the_input():
    """Nodes join in the field: a head fitted at 6 nodes runs at 4 and 9, each node its own group."""
    head, _, _ = head_case()
    per_node = 16 + 16 + 8
    for n in (4, 9):
        latents = torch.randn(2, n * per_node, 16)
        feats = head.scale_features(latents, torch.ones(2, n * per_node, dtype=torch.bool))
        assert feats["sensor"][0].shape == (2, n, 16)
        assert head(latents, torch.ones(2, n * per_node, dtype=torch.bool)).shape == (2, 5)
    with pytest.raises(ValueError, match="not a multiple"):
        head.scale_features(torch.randn(1, per_node + 3, 16), torch.ones(1, per_node + 3, dtype=torch.bool))


def test_head_shapes_and_protocol():
    head, latents, valid = head_case()
    logits = head(latents, valid)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    loss = head.loss(logits, make_batch(b=3))
    loss.backward()
    assert torch.isfinite(loss) and head.linear.weight.grad is not None
    pred = head.predict(logits)
    assert pred["label"].shape == (3,) and np.allclose(pred["probs"].sum(-1), 1.0, atol=1e-5)
    feats = head.scale_features(latents, valid)
    assert {k: tuple(v[0].shape) for k, v in feats.items()} == {"sensor": (3, 6, 16), "channel": (3, 3, 16),
                                                                "segment": (3, 4, 16)}
    assert feats["sensor"][1][0].tolist() == [True, False, True, True, True, True]
    assert not feats["channel"][1][2].any()
    rebuilt = MultiScaleFusionClassifier(16, 5, **{"layout": list(head.layout), "hidden": 8})
    rebuilt.load_state_dict(head.state_dict())
    assert torch.allclose(rebuilt(latents, valid), head(latents, valid).detach())


def test_head_ignores_absent_nodes_latents():
    head, latents, valid = head_case()
    ref = head(latents, valid)
    garbage = latents.clone()
    garbage[~valid] = torch.tensor(float("inf"))
    garbage[0, 16:32] = 1e6
    assert torch.allclose(head(garbage, valid), ref)
    assert all(torch.isfinite(f).all() for f, _ in head.scale_features(garbage, valid).values())
    # the other windows do not depend on window 0
    assert torch.allclose(head(latents[1:2], valid[1:2]), ref[1:2], atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_head_exports_to_onnx_and_matches_pytorch():
    ort = pytest.importorskip("onnxruntime")
    head, latents, valid = head_case()
    head.eval()
    f = io.BytesIO()
    torch.onnx.export(head, (latents[:2], valid[:2]), f, dynamo=False, opset_version=17,
                      input_names=["latents", "valid"], output_names=["logits"],
                      dynamic_axes={"latents": {0: "B", 1: "L"}, "valid": {0: "B", 1: "L"}, "logits": {0: "B"}})
    session = ort.InferenceSession(f.getvalue())
    (got,) = session.run(None, {"latents": latents.numpy(), "valid": valid.numpy()})
    np.testing.assert_allclose(got, head(latents, valid).detach().numpy(), atol=1e-4, rtol=1e-4)
    fewer = latents.shape[1] * 4 // 6  # 4 nodes instead of 6: the node axis is dynamic in the graph too
    few_latents = torch.cat([latents[:, :64], latents[:, 96:160], latents[:, 192:224]], dim=1)
    few_valid = torch.cat([valid[:, :64], valid[:, 96:160], valid[:, 192:224]], dim=1)
    assert few_latents.shape[1] == fewer
    (got,) = session.run(None, {"latents": few_latents.numpy(), "valid": few_valid.numpy()})
    np.testing.assert_allclose(got, head(few_latents, few_valid).detach().numpy(), atol=1e-4, rtol=1e-4)
