"""Training budgets as named presets: one table that `make models`, `spar-train`, `spar-export
distill` and the benchmarks read, so a result file can say which budget made it.

* ``smoke``: seconds to a minute on 2 CPU cores; what tests and `make models` (the fast path) use.
  Models trained with it are for plumbing, not for use.
* ``standard``: one to two hours on 2 CPU cores; what the shipped models are trained with.
* ``short``: the standard recording with a third of the epochs, about 1.5 hours on one core.
* ``full``: a workstation GPU (``--device cuda``): 20k+ windows, 100+ epochs, three seeds.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Budget:
    name: str
    windows: int  # unlabelled windows of the training recording (the last quarter validates)
    test_windows: int  # windows of a recording with another seed, never trained on (shipped-model check)
    pretrain_epochs: int  # self-supervised pretraining
    finetune_epochs: int  # full fine-tuning: encoder + heads end to end, layer-wise lr decay
    head_steps: int  # frozen-encoder heads (the paper's protocol), optimiser steps
    supervised_steps: int  # encoder + head from scratch, optimiser steps
    distill_epochs: int  # student distillation
    calibration_windows: int  # INT8 calibration
    seeds: tuple[int, ...]  # benchmark seeds (mean +- std over them)
    teacher: dict = field(default_factory=dict)  # SparConfig overrides of the teacher encoder
    # The distilled student's shape (spar-export distill flags; empty: its defaults), chosen from the
    # size / metric / latency table of `spar-bench quant --pareto` (benchmarks/results/quant.md).
    student: dict = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        return (f"budget `{self.name}`: {self.windows} windows, pretraining {self.pretrain_epochs} epochs, full "
                f"fine-tuning {self.finetune_epochs} epochs, frozen heads {self.head_steps} steps, distillation "
                f"{self.distill_epochs} epochs, seeds {list(self.seeds)}")


BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", windows=1600, test_windows=400, pretrain_epochs=10, finetune_epochs=2, head_steps=700,
                    supervised_steps=150, distill_epochs=30, calibration_windows=64, seeds=(0,),
                    note="about 10 minutes on 2 CPU cores; plumbing, not a usable model"),
    "standard": Budget("standard", windows=12000, test_windows=2000, pretrain_epochs=24, finetune_epochs=8,
                       head_steps=1500, supervised_steps=2000, distill_epochs=20, calibration_windows=256,
                       seeds=(0, 1, 2), student={"dim": 64, "heads": 4, "modality_depth": 1, "token_merge": 4},
                       note="one to two hours on 2 CPU cores; the shipped models"),
    # What one core trains in about 1.5 hours beside other work: the standard recording, a third of
    # the epochs. The seismic model 0.1.0 was built with it; `standard` is what it should get next.
    "short": Budget("short", windows=12000, test_windows=2000, pretrain_epochs=8, finetune_epochs=2,
                    head_steps=1500, supervised_steps=2000, distill_epochs=10, calibration_windows=256,
                    seeds=(0, 1, 2), student={"dim": 64, "heads": 4, "modality_depth": 1, "token_merge": 4},
                    note="about 1.5 hours on one CPU core: the standard recording with a third of the epochs"),
    "full": Budget("full", windows=24000, test_windows=4000, pretrain_epochs=100, finetune_epochs=30,
                   head_steps=3000, supervised_steps=8000, distill_epochs=60, calibration_windows=512,
                   seeds=(0, 1, 2), teacher={"dim": 128, "heads": 8, "decoder_dim": 64},
                   note="a workstation GPU (hours on a CPU)"),
}


def budget(name: str) -> Budget:
    """The preset ``name``; ValueError naming the known ones otherwise."""
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def shell_assignments(b: Budget) -> str:
    """``NAME=value`` lines for a shell script (`scripts/make_models.sh` evals them)."""
    lines = []
    for key, value in asdict(b).items():
        if isinstance(value, int | str):
            lines.append(f"BUDGET_{key.upper()}={shlex.quote(str(value))}")
    model = " ".join(f"--model {k}={v}" for k, v in b.teacher.items())
    student = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in b.student.items())
    lines += [f"BUDGET_TEACHER_MODEL={shlex.quote(model)}", f"BUDGET_STUDENT={shlex.quote(student)}",
              f"BUDGET_SEEDS={shlex.quote(' '.join(map(str, b.seeds)))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.budgets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a budget: " + ", ".join(BUDGETS) + " (none: list them)")
    parser.add_argument("--shell", action="store_true", help="print BUDGET_*=value lines for a shell script")
    args = parser.parse_args(argv)
    if args.name is None:
        for b in BUDGETS.values():
            print(f"{b.name:9s} {b.describe()} ({b.note})")
        return 0
    try:
        b = budget(args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(shell_assignments(b) if args.shell else b.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
