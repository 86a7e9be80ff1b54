"""`spar-train`: pretrain (SPAR / MAE / ablations), fine-tune heads with few labels, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from train.errors import TrainError
from train.objectives import objective_names

EPILOG = """examples:
  spar-node dataset --site configs/sites/parking_lot.toml --scenario parking_lot --windows 4000 --out data/lot
  spar-train pretrain --data data/lot --out runs/spar --objective spar --epochs 20
  spar-train finetune --data data/lot --encoder runs/spar --task localize --label-ratio 0.2 --out runs/spar-loc
  spar-train eval --checkpoint runs/spar-loc --data data/lot
  torchrun --nproc_per_node 2 -m train.cli pretrain --data data/lot --out runs/ddp   # DDP (gloo on CPU)
"""


def _model_overrides(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--model dim=32 --model modality_depth=1`` -> {"dim": 32, "modality_depth": 1}."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TrainError(f"--model expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = _literal(value.strip())
    return out


def _literal(text: str) -> Any:
    """``32`` -> 32, ``0.5`` -> 0.5, ``true`` -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with a table for this command (and [model]); flags win")
    p.add_argument("--data", help="dataset directory written by `spar-node dataset`")
    p.add_argument("--out", help="run directory (checkpoint.pt, config.json, log.jsonl)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="windows per step (per process under torchrun)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-fraction", type=float, help="last share of windows held out (default 0.25)")
    p.add_argument("--max-windows", type=int, help="use only the first N windows")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--model", action="append", metavar="KEY=VALUE",
                   help="model setting, repeatable: dim, heads, modality_depth, joint_depth, decoder_dim, "
                        "structural_dims, mask_ratio, masking, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar-train", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="self-supervised pretraining of the encoder",
                       description="Pretrain SPAR (or a baseline/ablation) on unlabelled windows. Resumes "
                                   "from OUT/checkpoint.pt when it exists.")
    _common(p)
    p.add_argument("--objective", choices=objective_names(), metavar="OBJECTIVE",
                   help="spar (default); mae (signal reconstruction only); robusthar (multi-scale "
                        "segment/channel/sensor masking, L1 + cross-scale consistency); aemp (2-D span "
                        "masking, multi-view, Gaussian NLL, autoregressive temporal module); supervised "
                        "(the encoder learns from labels, with a head); or one ablation of SPAR's "
                        f"Table 8. Known: {', '.join(objective_names())}")
    p = sub.add_parser("finetune", help="train a task head on a frozen encoder (or from scratch)",
                       description="Fine-tune a head. With --encoder the encoder stays frozen (unless "
                                   "--unfreeze); without it encoder and head train from scratch (the "
                                   "supervised baseline).")
    _common(p)
    p.add_argument("--task", help="classify, localize, detect or quake; several comma-separated (classify,localize) "
                                  "train one shared encoder with a head each and write OUT/<task>/ per task")
    p.add_argument("--encoder", help="pretrain run directory or checkpoint")
    p.add_argument("--label-ratio", type=float, help="share of training labels used (default 1.0)")
    p.add_argument("--unfreeze", action="store_true",
                   help="full fine-tuning: train the pretrained encoder too, every layer from the start, layer i "
                        "below the head at lr x layer-decay^i (default 0.75), warm-up then cosine decay")
    p.add_argument("--node-identity", action="store_true",
                   help="add a learnable per-node vector to the latents in the head (the fair MAE baseline: a "
                        "placement-agnostic encoder whose head knows which node each token came from)")
    p.add_argument("--head", choices=["transformer", "fusion", "map", "anchors"],  # train.heads.HEAD_VARIANTS
                   help="another head than the task's default: transformer (SPAR's classification head, one "
                        "transformer block before the linear readout), fusion (RobustHAR's multi-scale feature fusion, "
                        "classify), map (AEMP's localizer with distance and map-legality losses, localize; needs "
                        "a dataset with a floor plan) or anchors (detect: one DETR query per node, anchored at the "
                        "node, detections as offsets from it)")
    p.add_argument("--layerwise", action="store_true",
                   help="layer-wise fine-tuning (AEMP): the head alone for the first fifth of the epochs, then the "
                        "encoder too, each lower layer at a decayed learning rate (--layer-decay, default 0.5)")
    p.add_argument("--layer-decay", type=float, help="learning-rate factor per layer below the head (default 0.5 "
                                                    "with --layerwise, 0.75 with --unfreeze)")
    p.add_argument("--slots", choices=["site", "nearest", "mean", "random"],
                   help="structural positions for a layout the encoder was not pretrained on: site (node i "
                        "uses slot i, default), nearest (slot of the nearest pretraining node), mean (the mean "
                        "learned vector), random (a random learned slot). SPAR+LLM and MAE ignore it.")
    p.add_argument("--steps", type=int, help="train for at least this many steps instead of --epochs "
                                            "(same updates whatever the label ratio)")
    p = sub.add_parser("eval", help="metrics of a fine-tuned checkpoint on a dataset",
                       description="Evaluate a fine-tuned checkpoint on the validation windows of a dataset "
                                   "(or all of them), optionally with simulated node loss.")
    p.add_argument("--checkpoint", required=True, help="fine-tune run directory or checkpoint")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--drop-rate", type=float, default=0.0, help="drop each node's data with this probability")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    return parser


def _overrides(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    out = {name: getattr(args, name, None) for name in names}
    out["model"] = _model_overrides(args.model)
    if args.no_progress:
        out["progress"] = False
    return out


COMMON = ("data", "out", "epochs", "batch_size", "lr", "seed", "val_fraction", "max_windows", "device")


def _pretrain(args) -> int:
    from train.pretrain import run_pretrain
    from train.run_config import PretrainConfig, load_run_config

    cfg = load_run_config(PretrainConfig, args.config, "pretrain", _overrides(args, (*COMMON, "objective")))
    result = run_pretrain(cfg)
    if result.windows_per_s == 0:  # resumed a run that had already finished every epoch
        print(f"{result.checkpoint} already holds all {cfg.epochs} epochs ({result.steps} steps); nothing to do")
        return 0
    print(f"pretrained {cfg.objective}: {result.steps} steps, train loss {result.train_loss:.4f}, "
          f"val loss {result.val_loss:.4f}, {result.windows_per_s:.0f} windows/s -> {result.checkpoint}")
    return 0


def _finetune(args) -> int:
    from train.finetune import run_finetune
    from train.run_config import FinetuneConfig, load_run_config

    overrides = _overrides(args, (*COMMON, "task", "encoder", "label_ratio", "steps", "slots", "head",
                                  "layer_decay"))
    if args.layerwise:
        overrides["layerwise"] = True
    if args.unfreeze:
        overrides["freeze_encoder"] = False
    if args.node_identity:
        overrides["node_identity"] = True
    cfg = load_run_config(FinetuneConfig, args.config, "finetune", overrides)
    result = run_finetune(cfg)
    print(f"fine-tuned {cfg.task} on {result.train_windows} labelled windows; validation "
          f"({result.val_windows} windows): {_format(result.metrics)} -> {result.checkpoint}")
    return 0


def _eval(args) -> int:
    from train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, val_fraction=args.val_fraction,
                                  drop_rate=args.drop_rate, batch_size=args.batch_size, seed=args.seed,
                                  device=args.device)
    print(json.dumps(metrics, indent=2) if args.json else _format(metrics))
    return 0


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"pretrain": _pretrain, "finetune": _finetune, "eval": _eval}
    try:
        return commands[args.command](args)
    except TrainError as exc:
        print(f"spar-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spar-train: interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
