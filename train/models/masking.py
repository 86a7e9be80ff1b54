"""Which tokens the encoder sees during pretraining.

Tokens of one modality are laid out node-major: token ``j`` of node ``i`` sits at ``i * m + j``
of a length ``L = N * m`` sequence. Every strategy turns random scores into a ranking; the first
``n_keep`` valid tokens of the ranking stay visible, the rest of the valid tokens are masked (and
reconstructed). Invalid tokens (nodes that sent nothing) rank last and are neither kept nor
reconstructed. The random scores come from outside (``MaskNoise``) so that a global batch split
over DDP ranks masks exactly as one process would.

* ``random``: uniform scores; exactly ``round((1 - ratio) * valid)`` tokens kept per sample.
* ``node_balanced``: as random, but the ``min_visible`` lowest-scored tokens of every present node
  are moved to the front, so each node keeps at least that many while the kept count is unchanged
  (holds whenever ``n_keep >= min_visible * present nodes``).
* ``node_drop``: whole nodes are masked: ``round((1 - ratio) * present nodes)`` nodes kept (at least
  one), all their tokens visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("random", "node_balanced", "node_drop")


@dataclass
class MaskResult:
    """keep_index [B, K] sequence positions of visible tokens (ranked order),
    keep_valid [B, K] bool (False: padding where a sample keeps fewer than K),
    masked [B, L] bool: valid tokens hidden from the encoder (the reconstruction targets)."""

    keep_index: torch.Tensor
    keep_valid: torch.Tensor
    masked: torch.Tensor


def mask_tokens(valid: torch.Tensor, tokens_per_node: int, *, strategy: str, ratio: float,
                token_noise: torch.Tensor, node_noise: torch.Tensor, min_visible: int = 1) -> MaskResult:
    """Choose visible tokens.

    Args:
        valid: [B, L] bool, L = N * m; whole nodes are valid or not.
        tokens_per_node: m.
        token_noise: [B, L] uniform in [0, 1).
        node_noise: [B, N] uniform in [0, 1) (used by node_drop).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    b, length = valid.shape
    m = tokens_per_node
    n = length // m
    node_present = valid.reshape(b, n, m).any(dim=-1)  # [B, N]
    if strategy == "node_drop":
        score, n_keep = _node_drop_scores(node_present, node_noise, token_noise, m, ratio)
    else:
        score = token_noise.clone()
        n_keep = torch.round((1.0 - ratio) * valid.sum(dim=1).to(torch.float64)).to(torch.long)
        if strategy == "node_balanced":
            score = _balance(score, m, min_visible)
    score = score.masked_fill(~valid, float("inf"))
    order = torch.argsort(score, dim=1)  # [B, L], visible candidates first
    rank = torch.argsort(order, dim=1)  # position of each token in that order
    k = max(int(n_keep.max()), 1)
    keep_index = order[:, :k]
    keep_valid = torch.arange(k, device=valid.device)[None, :] < n_keep[:, None]
    masked = (rank >= n_keep[:, None]) & valid
    return MaskResult(keep_index, keep_valid, masked)


def _balance(score: torch.Tensor, m: int, min_visible: int) -> torch.Tensor:
    """Move the ``min_visible`` lowest scores of each node ahead of every other token."""
    b, length = score.shape
    per_node = score.reshape(b, length // m, m)
    rank_in_node = torch.argsort(torch.argsort(per_node, dim=-1), dim=-1)
    boosted = per_node - 2.0 * (rank_in_node < min(min_visible, m)).to(score.dtype)  # scores are in [0, 1)
    return boosted.reshape(b, length)


def _node_drop_scores(node_present: torch.Tensor, node_noise: torch.Tensor, token_noise: torch.Tensor,
                      m: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that rank whole nodes (by node noise), and the kept token count per sample."""
    node_rank = torch.argsort(torch.argsort(node_noise.masked_fill(~node_present, 2.0), dim=1), dim=1)
    score = node_rank.to(token_noise.dtype).repeat_interleave(m, dim=1) * 2.0 + token_noise  # node-grouped
    present = node_present.sum(dim=1).to(torch.float64)
    kept_nodes = torch.round((1.0 - ratio) * present).clamp_min(1.0).minimum(present)
    return score, kept_nodes.to(torch.long) * m


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, d], index [B, K] -> [B, K, d]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
