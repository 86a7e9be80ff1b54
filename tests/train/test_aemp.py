"""AEMP: span masking, multi-view, Gaussian NLL, the temporal module and its coupling, the loss;
the map-aware localization head (legality penalty, ONNX export); layer-wise fine-tuning."""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from train.batch import Batch
from train.heads.map_localizer import MapAwareLocalizer
from train.layerwise import apply_unfreezing, encoder_layers, layerwise_param_groups, unfrozen_depth
from train.models.aemp import (
    AempParams,
    AempPretrainer,
    TemporalAR,
    clipped_geometric_mean,
    gaussian_nll,
    geometric_lengths,
    span_mask,
    span_rectangles,
)
from train.models.config import ModalitySpec, SparConfig, objective_config
from train.models.positions import PositionFrame
from train.models.spar import SparEncoder
from train.objectives import build_pretrainer

CSI = ModalitySpec("csi", 16, 6, patch_grid=(4, 4))  # 4 subcarrier groups x 4 time patches
TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 3}


def make_cfg(**params) -> SparConfig:
    base = SparConfig(modalities=(CSI,), max_nodes=8, **TINY)
    return replace(objective_config(base, "aemp"), objective_params=params)


def make_model(**params) -> AempPretrainer:
    torch.manual_seed(0)
    model = AempPretrainer(make_cfg(**params))
    model.encoder.set_token_statistics({"csi": (-60.0, 5.0)})
    return model


def make_batch(b=4, n=8, seed=0, missing=()) -> Batch:
    """Windows of n APs; AP i is about 2 * i dB stronger than AP 0, so the ranking is known."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, 16, 6, generator=g) * 2 - 70 + 2.0 * torch.arange(n)[None, :, None, None]
    present = torch.ones(b, n, dtype=torch.bool)
    for sample, node in missing:
        present[sample, node] = False
        tokens[sample, node] = 0.0
    return Batch({"csi": tokens}, {"csi": present}, torch.rand(b, n, 2, generator=g) * 30,
                 torch.arange(n).repeat(b, 1), torch.zeros(b, dtype=torch.long), torch.full((b, 1), -1),
                 torch.rand(b, 1, 2, generator=g) * 30)


def noise_for(model, b=4, n=8, seed=1):
    return model.draw_noise(b, n, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- params
def test_params_validate_and_reject_unknown_keys():
    assert AempParams.from_dict({}).top_aps == 6
    with pytest.raises(ValueError, match="unknown aemp"):
        AempParams.from_dict({"span_q": 0.3})
    with pytest.raises(ValueError, match="span_p"):
        AempParams.from_dict({"span_p": 0.0})
    with pytest.raises(ValueError):
        build_pretrainer(make_cfg(mask_ratio=1.5))


# ----------------------------------------------------------------------------- span masking
def test_span_lengths_follow_the_clipped_geometric_distribution():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    lengths = geometric_lengths(u, 0.2, 10)
    assert int(lengths.min()) == 1 and int(lengths.max()) == 10
    # closed form: E = (1 - 0.8^10) / 0.2 = 4.463; P(l = 1) = p; P(l = 3) = 0.8^2 * 0.2
    assert abs(float(lengths.float().mean()) - clipped_geometric_mean(0.2, 10)) < 0.03
    assert abs(clipped_geometric_mean(0.2, 10) - 4.4631) < 1e-3
    assert abs(float((lengths == 1).float().mean()) - 0.2) < 0.005
    assert abs(float((lengths == 3).float().mean()) - 0.128) < 0.005
    # on a grid the rectangle's sides follow it too, clipped at the grid's extent
    rect = span_rectangles(torch.rand(50_000, 4, generator=torch.Generator().manual_seed(1)), 64, 4, 0.2, 10)
    assert abs(float(rect[:, 2].float().mean()) - clipped_geometric_mean(0.2, 10)) < 0.06
    assert abs(float(rect[:, 3].float().mean()) - clipped_geometric_mean(0.2, 4)) < 0.03
    assert bool((rect[:, 0] + rect[:, 2] <= 64).all() and (rect[:, 1] + rect[:, 3] <= 4).all())


def test_one_span_is_a_filled_contiguous_rectangle():
    u = torch.rand(500, 1, 4, generator=torch.Generator().manual_seed(2))
    rows, cols = 6, 5
    masks = span_mask(u, rows, cols, torch.full((500,), rows * cols), 0.3, 10).reshape(500, rows, cols)
    for mask in masks:
        r = torch.nonzero(mask.any(1)).flatten()
        c = torch.nonzero(mask.any(0)).flatten()
        assert r.tolist() == list(range(int(r[0]), int(r[-1]) + 1)), "rows of a span are not contiguous"
        assert c.tolist() == list(range(int(c[0]), int(c[-1]) + 1)), "columns of a span are not contiguous"
        assert int(mask.sum()) == len(r) * len(c), "a span is not a filled rectangle"
    # one row of m time patches (a modality without a grid): spans are runs along time
    runs = span_mask(u, 1, 12, torch.full((500,), 12), 0.3, 10)
    for mask in runs:
        idx = torch.nonzero(mask).flatten()
        assert idx.tolist() == list(range(int(idx[0]), int(idx[-1]) + 1))


def test_span_mask_masks_exactly_the_budget():
    u = torch.rand(2000, 32, 4, generator=torch.Generator().manual_seed(3))
    budget = torch.randint(0, 9, (2000,), generator=torch.Generator().manual_seed(4))
    masks = span_mask(u, 4, 4, budget, 0.2, 10)
    assert torch.equal(masks.sum(-1), budget)


def test_masked_fraction_is_the_target_and_absent_nodes_stay_unmasked():
    model = make_model(mask_ratio=0.25, top_aps=8)
    batch = make_batch(missing=((1, 7), (2, 6)))
    noise = noise_for(model)
    views = model.gather_views(batch, model.select_views(batch, noise))
    mask = model.mask(views, noise)["csi"]
    valid = mask.keep_valid
    assert not bool(mask.masked[~valid].any())
    per_node = mask.masked.reshape(len(valid), -1, 16).sum(-1)
    present = valid.reshape(len(valid), -1, 16).any(-1)
    assert set(per_node[present].tolist()) == {4}  # round(0.25 * 16) tokens of every present node
    assert float(mask.masked.sum() / valid.sum()) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- multi-view
def test_each_view_keeps_n_minus_1_of_the_top_n_strongest_aps():
    model = make_model(top_aps=4)
    batch = make_batch(b=3, n=8, missing=((1, 7),))  # AP 7 is the strongest, but absent in window 1
    index = model.select_views(batch, noise_for(model, b=3))
    assert index.shape == (3, 4, 3)
    tops = [{7, 6, 5, 4}, {6, 5, 4, 3}, {7, 6, 5, 4}]
    for w, top in enumerate(tops):
        dropped = [(top - set(view.tolist())) for view in index[w]]
        assert all(set(view.tolist()) <= top and len(set(view.tolist())) == 3 for view in index[w])
        assert sorted(d.pop() for d in dropped) == sorted(top), "each view leaves out a different AP"
    views = model.gather_views(batch, index)
    assert views.tokens["csi"].shape == (12, 3, 16, 6)
    assert torch.equal(views.node_index[:4], index[0])
    # a random subset of the views per step
    subset = make_model(top_aps=4, views_per_step=2).select_views(batch, noise_for(model, b=3))
    assert subset.shape == (3, 2, 3)
    assert all(len({tuple(v.tolist()) for v in w}) == 2 for w in subset)


def test_noise_slices_reproduce_the_full_batch():
    """DDP: each rank's slice of the global noise gives the loss one process would compute."""
    model = make_model(rollout_prob=1.0)
    batch, noise = make_batch(b=4), noise_for(model, b=4)
    full = model(batch, noise).loss
    halves = [model(batch.slice(a, a + 2), noise.slice(a, a + 2)).loss for a in (0, 2)]
    assert float(full.detach()) == pytest.approx(float(sum(halves).detach() / 2), rel=1e-5)


# ----------------------------------------------------------------------------- Gaussian NLL
def test_gaussian_nll_is_the_closed_form_and_minimal_at_the_squared_error():
    x, mu, logvar = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, math.log(2.0)])
    expected = [0.5 * (0.0 + 0.25 + math.log(2 * math.pi)), 0.5 * (math.log(2.0) + 4.0 / 2.0 + math.log(2 * math.pi))]
    assert gaussian_nll(x, mu, logvar).tolist() == pytest.approx(expected, abs=1e-6)
    torch_nll = torch.nn.functional.gaussian_nll_loss(mu, x, logvar.exp(), full=True, reduction="none")
    assert torch.allclose(gaussian_nll(x, mu, logvar), torch_nll, atol=1e-6)
    grid = torch.linspace(-4, 4, 8001)
    best = grid[torch.argmin(gaussian_nll(torch.tensor(1.0), torch.tensor(0.3), grid + math.log(0.49)))]
    assert float(best) == pytest.approx(0.0, abs=2e-3)  # sigma^2 = (x - mu)^2 = 0.49


def test_predicted_log_variance_is_clamped():
    model = make_model(logvar_min=-1.0, logvar_max=0.5)
    with torch.no_grad():
        model.decoders["csi"].head.bias[6:] = 100.0
    batch, noise = make_batch(), noise_for(model)
    views = model.gather_views(batch, model.select_views(batch, noise))
    positions, _ = model.encoder.prepare_positions(views.positions)
    masks = model.mask(views, noise)
    embedded, _ = model.embed(views, positions, masks, noise)
    gaussian = model.forward_decoder(*model.forward_encoder(embedded))["csi"]
    assert float(gaussian.logvar.detach().max()) == 0.5


# ----------------------------------------------------------------------------- temporal module
def test_teacher_forcing_and_rollout_shapes_and_first_step_agree():
    torch.manual_seed(0)
    ar = TemporalAR(frame_dim=6, dim=8, depth=2, heads=2, mlp_ratio=2.0, max_len=5)
    frames = torch.randn(3, 5, 6)
    forced = ar.teacher_forcing(frames)
    assert forced.shape == (3, 4, 6)  # frames 2..5 from frames 1..4
    rolled = ar.rollout(frames[:, :2], 3)
    assert rolled.shape == (3, 3, 6)  # frames 3..5 from frames 1..2 and its own predictions
    assert torch.allclose(rolled[:, 0], forced[:, 1], atol=1e-6)  # both predict frame 3 from frames 1..2
    assert not torch.allclose(rolled[:, 1], forced[:, 2], atol=1e-4)  # later steps read predictions
    changed = frames.clone()
    changed[:, 3:] += 1.0
    assert torch.allclose(ar.teacher_forcing(changed)[:, :3], forced[:, :3], atol=1e-6), "not causal"


def _grad_norm(loss, params) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_coupling_stops_the_temporal_gradient_then_lets_it_through():
    model = make_model(tf_start=0.0, tf_end=0.0, coupling_steps=3, coupling_ramp_steps=4, rollout_prob=1.0)
    batch, noise = make_batch(), noise_for(model)
    encoder = list(model.encoder.parameters())
    model.start_step(2, 10)
    assert model.coupling() == 0.0
    out = model(batch, noise)
    assert _grad_norm(out.pred, encoder) == 0.0, "the AR term reached the encoder during the stop-gradient phase"
    assert _grad_norm(out.pred, list(model.temporal.parameters())) > 0.0
    assert _grad_norm(out.nll, encoder) > 0.0
    model.start_step(4, 10)
    assert model.coupling() == pytest.approx(0.5)  # ramp: (4 - 3 + 1) / 4
    half = _grad_norm(model(batch, noise).pred, encoder)
    model.start_step(9, 10)
    assert model.coupling() == 1.0
    full = _grad_norm(model(batch, noise).pred, encoder)
    assert half > 0.0 and full == pytest.approx(2 * half, rel=1e-4)
    # the rollout starts from true frames: it trains the temporal module only
    assert _grad_norm(model(batch, noise).rollout, encoder) == 0.0


def test_schedules():
    model = make_model(ar_weight=2.0, tf_start=1.0, tf_end=0.2)
    assert model.ar_weight() == 2.0 and model.coupling() == 1.0  # no schedule yet: the end state
    model.start_step(0, 100)
    assert model.ar_weight() == 0.0 and model.teacher_probability() == 1.0 and model.coupling() == 0.0
    model.start_step(50, 100)
    assert model.ar_weight() == pytest.approx(1.0) and model.teacher_probability() == pytest.approx(0.6)
    assert model.coupling() == 1.0  # default: stop-gradient for the first 25% of training
    model.start_step(24, 100)
    assert model.coupling() == 0.0


def test_loss_combines_the_terms_as_eq_9():
    model = make_model(ar_weight=1.0, ar_weight_ramp=False, rollout_weight=0.25, rollout_prob=1.0)
    out = model(make_batch(), noise_for(model))
    total = (out.nll + 0.75 * out.pred + 0.25 * out.rollout).detach()
    assert float(out.loss.detach()) == pytest.approx(float(total), rel=1e-6)
    assert set(out.parts) == {"nll", "pred", "rollout"} and not out.parts["nll"].requires_grad
    never = make_model(ar_weight=1.0, ar_weight_ramp=False, rollout_weight=0.25, rollout_prob=0.0)
    out = never(make_batch(), noise_for(never))
    assert float(out.loss.detach()) == pytest.approx(float((out.nll + 0.75 * out.pred).detach()), rel=1e-6)


def test_uncertainty_weights_get_gradients():
    model = make_model(uncertainty_weighting=True, rollout_prob=1.0)
    model(make_batch(), noise_for(model)).loss.backward()
    assert model.log_vars.grad is not None and bool((model.log_vars.grad != 0).all())
    skipped = make_model(uncertainty_weighting=True, rollout_prob=0.0)
    skipped(make_batch(), noise_for(skipped)).loss.backward()
    assert skipped.log_vars.grad[0] != 0 and skipped.log_vars.grad[1] == 0, "an absent term moved its weight"
    assert make_model().log_vars is None


def test_a_few_steps_lower_the_loss():
    model = make_model(rollout_prob=1.0, ar_weight_ramp=False, coupling_steps=0)
    batch, noise = make_batch(), noise_for(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        model.start_step(step, 15)
        loss = model(batch, noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses


# ----------------------------------------------------------------------------- objective + loop
def test_build_pretrainer_and_one_epoch_of_pretraining(tiny_parking_dataset, tmp_path):
    from train.pretrain import load_encoder, run_pretrain
    from train.run_config import PretrainConfig

    model = build_pretrainer(make_cfg())
    assert isinstance(model, AempPretrainer) and isinstance(model.encoder, SparEncoder)
    cfg = PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "run"), objective="aemp", epochs=1,
                         batch_size=8, progress=False, device="cpu",
                         model={**TINY, "objective_params": {"views_per_step": 2, "rollout_prob": 1.0}})
    result = run_pretrain(cfg)
    assert result.steps >= 1 and math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    encoder, ckpt = load_encoder(result.checkpoint)
    assert encoder.cfg.objective == "aemp" and ckpt["model_config"]["objective_params"]["views_per_step"] == 2


# ----------------------------------------------------------------------------- map-aware head
# 4 rows x 5 columns of 1 m cells from (10, 20); a wall fills columns 2-3 of rows 0-2.
PLAN = {"grid": [[1, 1, 0, 0, 1], [1, 1, 0, 0, 1], [1, 1, 0, 0, 1], [1, 1, 1, 1, 1]], "origin": [10.0, 20.0],
        "cell_m": 1.0}
UNIT = PositionFrame(torch.zeros(1, 2), torch.ones(1))


def test_legality_penalty_is_zero_in_legal_cells_and_positive_outside():
    head = MapAwareLocalizer(8, legal_grid=PLAN)
    legal = torch.tensor([[10.1, 20.1], [11.9, 22.5], [14.5, 20.5], [12.5, 23.5], [11.99, 20.5]])
    assert torch.equal(head.map_penalty(legal), torch.zeros(5))
    wall = torch.tensor([[12.5, 21.0], [13.0, 21.0], [12.05, 20.5]])
    penalty = head.map_penalty(wall)
    assert bool((penalty > 0).all())
    assert float(penalty[1]) > float(penalty[2]), "deeper in the wall must cost more"
    outside = head.map_penalty(torch.tensor([[9.0, 21.0], [8.0, 21.0]]))
    assert bool((outside >= 10.0).all()) and float(outside[1]) > float(outside[0])


@pytest.mark.parametrize("start", [[12.3, 21.5], [13.6, 20.4], [8.0, 21.0], [12.5, 26.0]])
def test_legality_gradient_points_back_into_the_legal_area(start):
    head = MapAwareLocalizer(8, legal_grid=PLAN)
    point = torch.tensor([start], requires_grad=True)
    assert float(head.map_penalty(point).sum()) > 0.0
    for _ in range(200):
        penalty = head.map_penalty(point).sum()
        if float(penalty) == 0.0:
            break
        (grad,) = torch.autograd.grad(penalty, point)
        point = (point - 0.02 * grad / grad.norm().clamp_min(1e-9)).detach().requires_grad_(True)
    assert float(head.map_penalty(point).sum()) == 0.0, f"{start} descended to {point.tolist()}, still illegal"


def test_map_head_loss_terms():
    head = MapAwareLocalizer(8, legal_grid=PLAN, loc_weight=0.0, dist_weight=1.0, dist_threshold_m=1.0,
                             map_weight=0.0)
    batch = SimpleNamespace(target_position=torch.tensor([[[10.5, 20.5]], [[10.5, 20.5]], [[float("nan")] * 2]]))
    outputs = torch.tensor([[10.5, 21.0], [13.5, 24.5], [0.0, 0.0]], requires_grad=True)
    frame = PositionFrame(torch.zeros(3, 2), torch.ones(3))
    loss = head.loss(outputs, batch, frame)
    assert float(loss) == pytest.approx((0.0 + 4.0) / 2)  # errors 0.5 m (under the threshold) and 5 m
    loss.backward()
    assert torch.isfinite(outputs.grad).all() and float(outputs.grad[2].abs().sum()) == 0.0
    # map term: the second prediction is legal, the first inside the wall
    mapped = MapAwareLocalizer(8, legal_grid=PLAN, loc_weight=0.0, dist_weight=0.0, map_weight=1.0)
    wall = torch.tensor([[12.5, 21.0], [10.5, 20.5], [0.0, 0.0]])
    assert float(mapped.loss(wall, batch, frame)) == pytest.approx(float(mapped.map_penalty(wall[:1])) / 2)
    plain = MapAwareLocalizer(8)  # no floor plan: MSE + distance only
    assert math.isfinite(float(plain.loss(outputs, batch, frame)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, as export/ uses
def test_map_head_rebuilds_from_json_kwargs_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    kwargs = {"legal_grid": PLAN, "dist_weight": 0.2, "layers": 1, "heads": 2}
    head = MapAwareLocalizer(8, **kwargs).eval()
    rebuilt = MapAwareLocalizer(8, **json.loads(json.dumps(kwargs)))
    rebuilt.load_state_dict(head.state_dict())
    assert torch.equal(rebuilt.distance, head.distance) and "distance" in head.state_dict()
    latents, valid = torch.randn(3, 7, 8), torch.ones(3, 7, dtype=torch.bool)
    valid[1, 4:] = False
    path = tmp_path / "head.onnx"
    torch.onnx.export(head, (latents, valid), str(path), dynamo=False, opset_version=17,
                      input_names=["latents", "valid"], output_names=["position"],
                      dynamic_axes={"latents": {0: "batch", 1: "tokens"}, "valid": {0: "batch", 1: "tokens"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other, other_valid = torch.randn(5, 9, 8), torch.rand(5, 9) > 0.3
    with torch.no_grad():
        expected = head(other, other_valid).numpy()
    got = session.run(None, {"latents": other.numpy(), "valid": other_valid.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    metres = head.predict(torch.from_numpy(got), PositionFrame(torch.full((5, 2), 3.0), torch.full((5,), 2.0)))
    assert np.allclose(metres["position"], got * 2.0 + 3.0, atol=1e-5)


# ----------------------------------------------------------------------------- layer-wise fine-tuning
def _encoder_and_head():
    torch.manual_seed(0)
    cfg = SparConfig(modalities=(CSI, ModalitySpec("rssi", 4, 2)), max_nodes=8, **{**TINY, "modality_depth": 2,
                                                                                     "joint_depth": 2})
    return SparEncoder(cfg), MapAwareLocalizer(16, heads=2)


def test_layerwise_groups_cover_every_parameter_once_and_decay_with_depth():
    encoder, head = _encoder_and_head()
    groups = layerwise_param_groups(encoder, head, base_lr=1e-3, decay=0.5)
    assert len(groups) == 1 + 2 + 2 + 1  # head, joint blocks, modality blocks, embeddings
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in [*encoder.parameters(), *head.parameters()]}
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5 ** i for i in range(6)])
    layers = encoder_layers(encoder)
    assert {id(p) for p in layers[0]} == {id(p) for p in [*encoder.joint.blocks[1].parameters(),
                                                         *encoder.joint.norm.parameters()]}
    assert {id(p) for p in layers[-1]} == {id(p) for p in encoder.embeddings.parameters()}
    top_modality = {id(p) for p in layers[2]}
    assert all(id(p) in top_modality for s in encoder.encoders.values() for p in s.blocks[1].parameters())
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_unfreezing_schedule():
    assert [unfrozen_depth(e, 6) for e in (0, 19, 20, 99)] == [1, 1, 6, 6]  # the paper: head, then all
    assert [unfrozen_depth(e, 4, freeze_epochs=2, epochs_per_layer=3) for e in range(0, 12, 2)] == [1, 2, 2, 3, 4, 4]
    encoder, head = _encoder_and_head()
    layers = encoder_layers(encoder, head)
    apply_unfreezing(layers, 2)
    assert all(p.requires_grad for layer in layers[:2] for p in layer)
    assert not any(p.requires_grad for layer in layers[2:] for p in layer)
