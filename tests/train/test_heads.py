"""Task heads on synthetic latents: shapes, masking, losses, Hungarian matching, learning."""

import io

import numpy as np
import pytest
import torch

from train.batch import Batch
from train.heads import HEADS, DetrDetector, LinearClassifier, QuakeLocalizer, TransformerLocalizer, make_head
from train.heads.blocks import MaskedMultiheadAttention, masked_mean
from train.metrics import average_precision_at_r
from train.models.positions import PositionFrame

D, L, B = 16, 5, 4
NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with several intra-op threads on a loaded 2-core box, OpenMP
    synchronisation costs more than the work (measured 3 ms vs 40-190 ms per training step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batch(target_class, target_position, label=None) -> Batch:
    target_class = torch.as_tensor(target_class, dtype=torch.int64)
    target_position = torch.as_tensor(target_position, dtype=torch.float32)
    b = target_class.shape[0]
    if label is None:
        label = target_class[:, 0].clamp_min(0)
    return Batch(tokens={}, present={}, positions=torch.zeros(b, 3, 2), node_index=torch.zeros(b, 3, dtype=torch.int64),
                 label=torch.as_tensor(label, dtype=torch.int64), target_class=target_class,
                 target_position=target_position)


def identity_frame(b: int, d_s: int = 2) -> PositionFrame:
    return PositionFrame(torch.zeros(b, d_s), torch.ones(b))


def random_frame(b: int, gen: torch.Generator, d_s: int = 2) -> PositionFrame:
    return PositionFrame(torch.randn(b, d_s, generator=gen) * 10, torch.rand(b, generator=gen) * 5 + 1)


def head_case(task: str):
    """(head, batch with targets for it) for B windows; the last window has no target."""
    torch.manual_seed(0)
    out_dims = 3 if task == "quake" else 2
    head = make_head(task, D, n_classes=5, out_dims=out_dims)
    cls = torch.tensor([[1, 3], [2, -1], [4, 4], [-1, -1]])
    pos = torch.randn(B, 2, out_dims) * 5
    pos[cls < 0] = NAN
    return head, make_batch(cls, pos)


def run_head(head, latents, valid):
    out = head(latents, valid)
    return out if isinstance(out, dict) else {"out": out}


@pytest.mark.parametrize("task", sorted(HEADS))
def test_head_shapes_and_predict(task):
    head, batch = head_case(task)
    frame = random_frame(B, torch.Generator().manual_seed(1))
    out = head(torch.randn(B, L, D), torch.ones(B, L, dtype=torch.bool))
    pred = head.predict(out, frame)
    if task == "classify":
        assert out.shape == (B, 5)
        assert pred["label"].shape == (B,) and pred["probs"].shape == (B, 5)
        np.testing.assert_allclose(pred["probs"].sum(-1), 1.0, rtol=1e-5)
    elif task == "detect":
        assert out["logits"].shape == (B, 8, 6) and out["positions"].shape == (B, 8, 2)
        assert pred["scores"].shape == (B, 8) and pred["classes"].shape == (B, 8)
        assert pred["positions"].shape == (B, 8, 2) and pred["classes"].max() < 5  # never "no object"
        np.testing.assert_allclose(pred["positions"], frame.denormalize(out["positions"]).detach().numpy())
    else:
        dims = 3 if task == "quake" else 2
        assert out.shape == (B, dims) and pred["position"].shape == (B, dims)
        np.testing.assert_allclose(pred["position"], frame.denormalize(out).detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("task", sorted(HEADS))
def test_invalid_tokens_do_not_influence_outputs(task):
    head, _ = head_case(task)
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(B, L, D, generator=gen)
    valid = torch.rand(B, L, generator=gen) > 0.4
    valid[:, 0] = True
    valid[-1] = False  # an all-invalid window (every node missing)
    ref = run_head(head, latents, valid)
    noisy = latents.clone()
    noisy[~valid] = 1e30
    noisy[0, ~valid[0]] = float("inf")
    other = run_head(head, noisy, valid)
    # extra padding tokens at the end must not matter either
    padded = run_head(head, torch.cat([latents, torch.randn(B, 3, D, generator=gen)], 1),
                      torch.cat([valid, torch.zeros(B, 3, dtype=torch.bool)], 1))
    for key in ref:
        assert torch.isfinite(ref[key]).all(), key
        assert torch.equal(ref[key], other[key]), key
        torch.testing.assert_close(ref[key], padded[key], rtol=1e-5, atol=1e-6)
    # an all-invalid window gives the same output whatever its latents hold
    again = run_head(head, torch.where(valid[..., None], latents, torch.randn(B, L, D, generator=gen)), valid)
    for key in ref:
        assert torch.equal(ref[key][-1], again[key][-1])


@pytest.mark.parametrize("task", sorted(HEADS))
def test_loss_is_finite_and_backpropagates(task):
    head, batch = head_case(task)
    frame = random_frame(B, torch.Generator().manual_seed(3))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[-1, 2:] = False
    loss = head.loss(head(torch.randn(B, L, D), valid), batch, frame)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_make_head_rejects_unknown_tasks_and_builds_known_ones():
    with pytest.raises(ValueError, match="classify, detect, localize, quake"):
        make_head("segment", D, 5, 2)
    assert isinstance(make_head("classify", D, 5, 2), LinearClassifier)
    assert isinstance(make_head("localize", D, 5, 2), TransformerLocalizer)
    assert isinstance(make_head("quake", D, 5, 3), QuakeLocalizer)
    det = make_head("detect", D, 5, 2, n_queries=3)
    assert isinstance(det, DetrDetector) and det.n_queries == 3 and len(det.blocks) == 2
    assert len(make_head("localize", D, 5, 2).blocks) == 1 and len(make_head("quake", D, 5, 3).blocks) == 2


def test_masked_mean_and_attention_on_hand_cases():
    latents = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(latents, valid), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    attn = MaskedMultiheadAttention(2, heads=1)
    out = attn(latents, latents, valid)
    assert torch.isfinite(out).all()
    # no valid key: attention contributes only the output bias
    torch.testing.assert_close(out[1], attn.out.bias.expand(3, 2))


def test_localizer_targets_are_normalised_and_nan_rows_do_not_count():
    head = TransformerLocalizer(D, out_dims=2)
    frame = PositionFrame(torch.tensor([[10.0, 20.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 1.0, 1.0]))
    batch = make_batch([[1], [-1], [2]], [[[12.0, 24.0]], [[NAN, NAN]], [[1.0, 1.0]]])
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    assert head.loss(pred, batch, frame).item() == 0.0  # (12, 24) is (1, 2) in window 0's frame
    moved = pred.detach().clone()
    moved[1] = 1e6
    assert float(head.loss(moved, batch, frame)) == 0.0
    moved[2] = torch.tensor([2.0, 3.0])  # errors 1 and 2 -> mean over 2 kept rows x 2 dims = 5 / 4
    assert float(head.loss(moved, batch, frame)) == pytest.approx(5 / 4)
    # a batch without any target: 0, and backward() still works with zero (not NaN) gradients
    empty = make_batch([[-1], [-1], [-1]], torch.full((3, 1, 2), NAN))
    loss = head.loss(pred, empty, frame)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="3-D"):
        head.loss(pred, make_batch([[1]] * 3, torch.zeros(3, 1, 3)), frame)


def test_quake_depth_is_scaled_not_shifted():
    head = QuakeLocalizer(D)
    frame = PositionFrame(torch.tensor([[10.0, 20.0]]), torch.tensor([5.0]))
    pred = head.predict(torch.tensor([[0.0, 0.0, 1.0]]), frame)
    np.testing.assert_allclose(pred["position"], [[10.0, 20.0, 5.0]])
    batch = make_batch([[0]], [[[10.0, 20.0, 5.0]]])
    assert float(head.loss(torch.tensor([[0.0, 0.0, 1.0]]), batch, frame)) == 0.0


def test_localizer_learns_a_linear_target():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    weight = torch.randn(D, 2, generator=gen)
    head = TransformerLocalizer(D, out_dims=2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    def sample(n):
        latents = torch.randn(n, L, D, generator=gen)
        valid = torch.rand(n, L, generator=gen) > 0.3
        valid[:, 0] = True
        frame = random_frame(n, gen)
        target = frame.denormalize(masked_mean(latents, valid) @ weight)  # metres
        return latents, valid, frame, make_batch(torch.ones(n, 1), target[:, None])

    test = sample(256)
    with torch.no_grad():
        initial = float(head.loss(head(test[0], test[1]), test[3], test[2]))
    for _ in range(200):
        latents, valid, frame, batch = sample(64)
        loss = head.loss(head(latents, valid), batch, frame)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(head.loss(head(test[0], test[1]), test[3], test[2]))
    assert final < 0.05 * initial, (initial, final)


# ---------------------------------------------------------------------------------- DETR detector

def detr_outputs(class_probs, positions):
    """Hand-made outputs: class_probs [B, Q, C+1] probabilities -> log-prob logits."""
    return {"logits": torch.log(torch.as_tensor(class_probs, dtype=torch.float32)).requires_grad_(),
            "positions": torch.as_tensor(positions, dtype=torch.float32).requires_grad_()}


def three_query_case(q1_position=(-3.0, 3.0)):
    """2 targets (class 1 at (0, 0), class 2 at (5, 5)) and 3 queries: q0 looks like target 2,
    q1 says "no object", q2 looks like target 1. n_classes = 3 -> 4 logits (index 3 = no object)."""
    probs = [[[0.05, 0.05, 0.85, 0.05], [0.05, 0.05, 0.05, 0.85], [0.05, 0.85, 0.05, 0.05]]]
    positions = [[[5.2, 4.9], list(q1_position), [0.3, -0.2]]]
    batch = make_batch([[1, 2, -1]], [[[0.0, 0.0], [5.0, 5.0], [NAN, NAN]]])
    return probs, positions, batch


def matched(det, probs, positions, batch, frame=None):
    (q_idx, slot_idx), = det.match(detr_outputs(probs, positions), batch, frame or identity_frame(1))
    return dict(zip(q_idx.tolist(), slot_idx.tolist(), strict=True))


def test_hungarian_matching_picks_the_obvious_assignment():
    det = DetrDetector(D, n_classes=3, n_queries=3)
    assert matched(det, *three_query_case()) == {2: 0, 0: 1}
    # The empty slot (-1) is never matched, and the window's frame is applied to the targets.
    frame = PositionFrame(torch.tensor([[5.0, 5.0]]), torch.tensor([1.0]))  # target 2 -> (0, 0)
    probs, positions, batch = three_query_case()
    assert matched(det, probs, [[[0.0, 0.0], [-3.0, 3.0], [-5.0, -5.0]]], batch, frame) == {2: 0, 0: 1}


def test_hungarian_cost_weights_trade_class_against_position():
    # q1 ("no object", p(class 1) = 0.05) sits exactly on target 1; q2 (p = 0.85) is 0.5 away (L1).
    case = three_query_case(q1_position=(0.0, 0.0))
    det = DetrDetector(D, n_classes=3, n_queries=3, w_class=1.0, w_pos=5.0)
    assert matched(det, *case) == {1: 0, 0: 1}  # -0.05 + 5 * 0  <  -0.85 + 5 * 0.5
    det.w_pos = 0.1
    assert matched(det, *case) == {2: 0, 0: 1}  # -0.85 + 0.05  <  -0.05


def test_detr_loss_matches_a_hand_computation_and_ignores_query_order():
    det = DetrDetector(D, n_classes=3, n_queries=3, w_class=1.0, w_pos=5.0, eos_coef=0.1)
    probs, positions, _ = three_query_case()
    probs[0][1] = [0.1, 0.1, 0.2, 0.6]  # unequal per-query CE terms, so the eos weighting shows
    # metres (1, 1) and (11, 11) are (0, 0) and (5, 5) in a frame centred on (1, 1) with scale 2
    batch = make_batch([[1, 2, -1]], [[[1.0, 1.0], [11.0, 11.0], [NAN, NAN]]])
    frame = PositionFrame(torch.tensor([[1.0, 1.0]]), torch.tensor([2.0]))
    loss = det.loss(detr_outputs(probs, positions), batch, frame)
    # CE: q0 -> class 2, q2 -> class 1 (p = 0.85, weight 1 each), q1 -> no object (p = 0.6, weight 0.1)
    ce = -(np.log(0.85) + np.log(0.85) + 0.1 * np.log(0.6)) / 2.1
    l1 = (0.2 + 0.1 + 0.3 + 0.2) / 2  # summed over coordinates, per matched target
    assert loss.item() == pytest.approx(ce + 5 * l1, rel=1e-5)
    for perm in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
        permuted = det.loss(detr_outputs(np.asarray(probs)[:, perm], np.asarray(positions)[:, perm]), batch, frame)
        assert permuted.item() == pytest.approx(loss.item(), rel=1e-6)
    # an MSE position loss squares the same matched errors
    det.pos_loss = "mse"
    mse = (0.04 + 0.01 + 0.09 + 0.04) / 2
    assert det.loss(detr_outputs(probs, positions), batch, frame).item() == pytest.approx(ce + 5 * mse, rel=1e-5)


def test_detr_loss_without_targets_and_with_bad_class_ids():
    det = DetrDetector(D, n_classes=3, n_queries=4)
    out = det(torch.randn(2, L, D), torch.ones(2, L, dtype=torch.bool))
    empty = make_batch([[-1, -1], [-1, -1]], torch.full((2, 2, 2), NAN))
    loss = det.loss(out, empty, identity_frame(2))
    loss.backward()
    assert torch.isfinite(loss) and det.class_head.weight.grad.abs().sum() > 0
    # with no targets, every query is trained towards "no object": CE equals the plain mean NLL of index 3
    expected = -torch.log_softmax(out["logits"], -1)[..., 3].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="n_classes=3"):
        det.loss(out, make_batch([[3, -1], [1, -1]], torch.zeros(2, 2, 2)), identity_frame(2))
    with pytest.raises(ValueError, match="non-finite"):
        det.loss(out, make_batch([[1, -1], [1, -1]], torch.full((2, 2, 2), NAN)), identity_frame(2))


def detection_set(n, gen, d=32):
    """Windows with 1-2 objects (classes 1, 2) at positions in [-2, 2]^2; one valid latent token
    per object encodes its class and position (fixed random embedding) plus noise, the rest are
    noise tokens; two padding tokens are invalid."""
    class_embed = torch.randn(3, d, generator=torch.Generator().manual_seed(99))
    pos_embed = torch.randn(2, d, generator=torch.Generator().manual_seed(98))
    count = torch.randint(1, 3, (n,), generator=gen)
    classes = torch.randint(1, 3, (n, 2), generator=gen)
    classes[:, 1] = torch.where(count == 2, classes[:, 1], -1)
    positions = torch.rand(n, 2, 2, generator=gen) * 4 - 2
    positions[classes < 0] = NAN
    latents = torch.randn(n, 6, d, generator=gen) * 0.3
    obj = class_embed[classes.clamp_min(0)] + torch.nan_to_num(positions) @ pos_embed  # [n, 2, d]
    latents[:, :2] += torch.where((classes >= 0)[..., None], obj, torch.zeros_like(obj))
    valid = torch.ones(n, 6, dtype=torch.bool)
    valid[:, 4:] = False
    return latents, valid, make_batch(classes, positions)


def detection_map(det, data, r=1.0):
    latents, valid, batch = data
    with torch.no_grad():
        pred = det.predict(det(latents, valid), identity_frame(len(batch)))
    return average_precision_at_r(pred["scores"], pred["classes"], pred["positions"], batch.target_class.numpy(),
                                  batch.target_position.numpy(), r)


def test_detector_learns_on_a_synthetic_set():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    det = DetrDetector(32, n_classes=3, n_queries=4, layers=2)
    test = detection_set(128, gen)
    untrained = detection_map(det, test)
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    for _ in range(150):
        latents, valid, batch = detection_set(32, gen)
        loss = det.loss(det(latents, valid), batch, identity_frame(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = detection_map(det, test)
    assert trained > untrained + 0.3, (untrained, trained)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("task", ["localize", "detect"])
def test_heads_export_to_onnx_with_dynamic_shapes(task):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    head, _ = head_case(task)
    head.eval()
    names = ["logits", "positions"] if task == "detect" else ["position"]
    f = io.BytesIO()
    torch.onnx.export(head, (torch.randn(2, L, D), torch.ones(2, L, dtype=torch.bool)), f, dynamo=False,
                      input_names=["latents", "valid"], output_names=names,
                      dynamic_axes={"latents": {0: "B", 1: "L"}, "valid": {0: "B", 1: "L"}})
    session = ort.InferenceSession(f.getvalue())
    latents = torch.randn(3, L + 2, D)
    valid = torch.rand(3, L + 2) > 0.3
    valid[2] = False
    got = session.run(None, {"latents": latents.numpy(), "valid": valid.numpy()})
    ref = run_head(head, latents, valid)
    for name, value in zip(names, got, strict=True):
        expected = ref[name] if task == "detect" else ref["out"]
        np.testing.assert_allclose(value, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def anchor_case(n=5, seed=0):
    """(NodeAnchorDetector, latents [2, L, D], valid, node positions [2, n, 2])."""
    from train.heads.anchor_detector import NodeAnchorDetector

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    det = NodeAnchorDetector(D, n_classes=3, layers=1)
    return det, torch.randn(2, L, D, generator=gen), torch.ones(2, L, dtype=torch.bool), torch.randn(2, n, 2,
                                                                                                     generator=gen)


def test_anchor_detector_has_one_query_per_node_starting_at_its_node():
    det, latents, valid, nodes = anchor_case()
    out = det(latents, valid, nodes)
    assert out["logits"].shape == (2, 5, 4) and out["positions"].shape == (2, 5, 2)
    # untrained, every query's vehicle sits on its own node: the offset head starts at zero
    torch.testing.assert_close(out["positions"], nodes)
    assert det(latents, valid, nodes[:, :3])["logits"].shape == (2, 3, 4)  # any node count
    with pytest.raises(ValueError, match="2-D node positions"):
        det(latents, valid, torch.zeros(2, 5, 3))


def test_anchor_detector_follows_its_nodes_when_they_are_reordered():
    """Swapping two nodes swaps their queries' outputs and changes nothing else: the anchors are the
    nodes the aggregator assembled, not slots of a learnt table."""
    det, latents, valid, nodes = anchor_case(seed=3)
    with torch.no_grad():
        for p in det.position_head[-1].parameters():
            p.normal_(0, 0.1)  # a trained-like offset head, so positions depend on the decoder too
    det.eval()
    order = torch.tensor([3, 1, 2, 0, 4])
    base, swapped = det(latents, valid, nodes), det(latents, valid, nodes[:, order])
    for key in ("logits", "positions"):
        torch.testing.assert_close(swapped[key], base[key][:, order])


def test_anchor_detector_three_dimensional_output_pads_depth():
    from train.heads.anchor_detector import NodeAnchorDetector

    det = NodeAnchorDetector(D, n_classes=2, out_dims=3, position_dims=2, layers=1)
    nodes = torch.randn(1, 4, 2)
    out = det(torch.randn(1, L, D), torch.ones(1, L, dtype=torch.bool), nodes)
    torch.testing.assert_close(out["positions"], torch.cat([nodes, torch.zeros(1, 4, 1)], -1))


def test_anchor_detector_learns_where_the_plain_queries_have_no_anchor():
    """Objects lie next to one of 6 nodes; the latent tokens say which class is near which node
    only through the node position they carry (as SPAR's spatial embedding does). The anchored head
    must reach a high mAP within 1 unit quickly, and far above its untrained self."""
    from train.heads.anchor_detector import NodeAnchorDetector

    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    d = 32
    pos_embed = torch.randn(2, d, generator=torch.Generator().manual_seed(1))
    class_embed = torch.randn(3, d, generator=torch.Generator().manual_seed(2))

    def windows(n):
        nodes = torch.rand(n, 6, 2, generator=gen) * 8 - 4
        which = torch.randint(0, 6, (n,), generator=gen)
        cls = torch.randint(1, 3, (n, 1), generator=gen)
        target = nodes[torch.arange(n), which][:, None] + torch.rand(n, 1, 2, generator=gen) - 0.5
        latents = nodes @ pos_embed + torch.randn(n, 6, d, generator=gen) * 0.1  # one token per node
        latents[torch.arange(n), which] += class_embed[cls[:, 0]]
        return latents, torch.ones(n, 6, dtype=torch.bool), nodes, make_batch(cls, target)

    def score(det, data):
        latents, valid, nodes, batch = data
        with torch.no_grad():
            pred = det.predict(det(latents, valid, nodes), identity_frame(len(batch)))
        return average_precision_at_r(pred["scores"], pred["classes"], pred["positions"],
                                      batch.target_class.numpy(), batch.target_position.numpy(), 1.0)

    det = NodeAnchorDetector(d, n_classes=3, layers=2)
    test = windows(128)
    untrained = score(det, test)
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    for _ in range(150):
        latents, valid, nodes, batch = windows(32)
        loss = det.loss(det(latents, valid, nodes), batch, identity_frame(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = score(det, test)
    assert trained > 0.6 and trained > untrained + 0.3, (untrained, trained)
