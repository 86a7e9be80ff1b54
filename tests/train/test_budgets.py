"""Budget presets: one table, readable by shell scripts, refusing unknown names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from train.budgets import BUDGETS, budget, main


def test_presets_grow_from_smoke_to_full():
    smoke, standard, full = (BUDGETS[n] for n in ("smoke", "standard", "full"))
    for name in ("windows", "pretrain_epochs", "finetune_epochs"):
        assert getattr(smoke, name) <= getattr(standard, name) <= getattr(full, name), name
    seen = [b.windows * b.distill_epochs for b in (smoke, standard, full)]  # windows the student sees
    assert seen == sorted(seen)
    assert standard.windows >= 10_000 and len(full.seeds) == 3 and full.windows >= 20_000
    short = BUDGETS["short"]  # the standard recording with fewer epochs
    assert short.windows == standard.windows and short.pretrain_epochs < standard.pretrain_epochs


def test_shell_lines_survive_eval_in_bash():
    out = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m train.budgets standard --shell)"; '
                                       'echo "$BUDGET_WINDOWS|$BUDGET_NOTE|$BUDGET_SEEDS|$BUDGET_STUDENT"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"12000|{BUDGETS['standard'].note}|0 1 2|--dim 64 --heads 4 --modality-depth 1 --token-merge 4"
    # the flags are spar-export distill's own
    from export.cli import build_parser

    args = build_parser().parse_args(["distill", "--teacher", "t", "--data", "d", "--out", "o",
                                      *out.rsplit("|", 1)[1].split()])
    assert (args.dim, args.heads, args.modality_depth, args.token_merge) == (64, 4, 1, 4)


def test_unknown_budget_is_refused(capsys):
    with pytest.raises(ValueError, match="known: smoke, standard, short, full"):
        budget("huge")
    assert main(["huge"]) == 2 and "unknown budget" in capsys.readouterr().err
