"""Export-time attention: every ``train.models.transformer.Attention`` of a model traced as one fused
ONNX op (``export.attention`` says which modes exist and why).

The swap replaces only the forward of the model's own Attention instances, for the duration of the
export; torch computes the same values inside the fused op's ``torch.autograd.Function`` while the
TorchScript exporter traces it, and the Function's ``symbolic`` writes the one ONNX node.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from export.attention import check_mode

# The model's mask fill (train.models.transformer): the most negative finite float32.
MASK_FILL = float(torch.finfo(torch.float32).min)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, d] -> [B, h, L, d / h]."""
    b, length, d = x.shape
    return x.reshape(b, length, heads, d // heads).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, heads: int) -> torch.Tensor:
    """q [B, Lq, d], k and v [B, Lk, d], mask additive [B, 1, 1 or Lq, Lk] or None -> [B, Lq, d]."""
    b, lq, d = q.shape
    out = nn.functional.scaled_dot_product_attention(_heads_first(q, heads), _heads_first(k, heads),
                                                     _heads_first(v, heads), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, d)


def _additive(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Lk] bool -> [B, 1, 1, Lk]: 0 where valid, the most negative finite value elsewhere."""
    return torch.zeros(key_valid.shape, dtype=dtype).masked_fill(~key_valid, MASK_FILL)[:, None, None, :]


class _MultiHeadAttention(torch.autograd.Function):
    """ONNX Runtime's com.microsoft MultiHeadAttention: torch computes it while tracing, the graph
    gets the one op. q [B, Lq, d], k/v [B, Lk, d] without bias, bias [3d], key_padding [B, Lk] int32
    (1 = attend) or None -> [B, Lq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding, heads: int):  # noqa: ARG004  # ctx: autograd's, unused
        d = q.shape[-1]
        mask = None if key_padding is None else _additive(key_padding != 0, q.dtype)
        return _sdpa(q + bias[:d], k + bias[d:2 * d], v + bias[2 * d:], mask, heads)

    @staticmethod
    def symbolic(g, q, k, v, bias, key_padding, heads: int):
        inputs = [q, k, v, bias] + ([] if key_padding is None or _is_none(key_padding) else [key_padding])
        # mask_filter_value: the model's own fill, so masked keys weigh exactly what they weigh in torch
        out = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads, mask_filter_value_f=MASK_FILL)
        out.setType(q.type())  # [B, Lq, d] like q: the exporter has no shape function for contrib ops
        return out


class _Attention23(torch.autograd.Function):
    """ONNX Attention (opset 23) with 3-D inputs: q [B, Lq, d], k/v [B, Lk, d], additive mask
    [B, 1, Lq, Lk] or None -> [B, Lq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, mask, heads: int):  # noqa: ARG004  # ctx: autograd's, unused
        return _sdpa(q, k, v, mask, heads)

    @staticmethod
    def symbolic(g, q, k, v, mask, heads: int):
        inputs = [q, k, v] + ([] if mask is None or _is_none(mask) else [mask])
        out = g.op("Attention", *inputs, q_num_heads_i=heads, kv_num_heads_i=heads)
        out.setType(q.type())  # 3-D inputs give a 3-D [B, Lq, d] output
        return out


def _is_none(value) -> bool:
    """A TorchScript graph value that stands for a Python None (an omitted optional input)."""
    return value.node().mustBeNone() if hasattr(value, "node") else False


def _mha_forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``Attention.forward`` for export as MultiHeadAttention; same shapes and values."""
    d = x.shape[-1]
    q = nn.functional.linear(x, self.q.weight)
    k, v = nn.functional.linear(context, self.kv.weight).split(d, dim=-1)  # Split: K and V keep a known width
    bias = torch.cat([self.q.bias, self.kv.bias])
    padding = None if key_valid is None else key_valid.to(torch.int32)
    out = _MultiHeadAttention.apply(q, k, v, bias, padding, self.heads)
    return self.out(_zero_rows_without_keys(out, key_valid))


def _attention23_forward(self, x: torch.Tensor, context: torch.Tensor,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``Attention.forward`` for export as ONNX Attention-23; same shapes and values."""
    b, lq, d = x.shape
    q = self.q(x)
    k, v = self.kv(context).split(d, dim=-1)
    mask = None if key_valid is None else _additive(key_valid, q.dtype).expand(b, 1, lq, key_valid.shape[1])
    out = _Attention23.apply(q, k, v, mask, self.heads)
    return self.out(_zero_rows_without_keys(out, key_valid))


def _zero_rows_without_keys(out: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """[B, Lq, d] with the rows of windows that have no valid key zeroed, as the model does."""
    if key_valid is None:
        return out
    return out * key_valid.any(dim=-1).to(out.dtype)[:, None, None]


_FORWARDS = {"mha": _mha_forward, "attention23": _attention23_forward}


@contextlib.contextmanager
def attention_for_export(model: nn.Module, mode: str) -> Iterator[int]:
    """Within the block every ``train.models.transformer.Attention`` of ``model`` exports as ``mode``
    (``mha`` or ``attention23``; ``plain`` and ``ort-fusion`` leave the model as it is). Yields how many
    attention modules were swapped. Only these instances change (an instance attribute shadows the
    class's forward), and they are restored on exit."""
    from train.models.transformer import Attention

    check_mode(mode)
    forward = _FORWARDS.get(mode)
    swapped = [m for m in model.modules() if isinstance(m, Attention)] if forward else []
    for module in swapped:
        module.forward = types.MethodType(forward, module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
