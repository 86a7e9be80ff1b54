"""`spar-export`: from a trained checkpoint to what runs on the edge box.

checkpoint(s) --distill--> student --onnx--> model.onnx --quantize--> model.int8.onnx --engine--> TensorRT
Every artifact gets a manifest (feature hashes, node range, inputs/outputs, metric, sha256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.attention import ATTENTION_MODES, DEFAULT_ATTENTION
from export.errors import ExportError
from export.formats import engine_name, export_format, formats_help, int8_name

_ONNX, _PLAIN = export_format("onnx"), export_format("onnx-plain")
_INT8, _INT8_PLAIN = export_format("onnx-int8"), export_format("onnx-int8-plain")
EPILOG = ("formats (export.formats; `python -m export.formats --markdown` prints them as Markdown):\n"
          + formats_help() + f"""

examples:
  spar-export distill --teacher runs/spar-cls --teacher runs/spar-loc --data data/lot --out runs/student
  spar-export onnx --checkpoint runs/student --data data/lot --out models/parking_lot --name spar-parking-lot
  spar-export quantize --onnx models/parking_lot/{_ONNX.file} --checkpoint runs/student --data data/lot
  spar-export quantize --onnx models/parking_lot/{_PLAIN.file} --checkpoint runs/student --data data/lot
  spar-export engine --onnx models/parking_lot/{_INT8_PLAIN.file} --precision int8   # on the Jetson
""")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar-export", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a small student on a fine-tuned teacher's outputs",
                       description="Distil the frozen teacher (encoder + heads of fine-tuned checkpoints that "
                                   "share one encoder) into a narrower, shallower student on unlabelled windows.")
    p.add_argument("--teacher", action="append", required=True, help="fine-tuned checkpoint (repeat per head)")
    p.add_argument("--data", required=True, help="dataset directory (labels are not used)")
    p.add_argument("--out", required=True, help="output directory (checkpoint.pt, report.md)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--dim", type=int, help="student width (default 32)")
    p.add_argument("--heads", type=int, help="student attention heads (default 2)")
    p.add_argument("--modality-depth", type=int, help="blocks of each per-modality encoder (default 1)")
    p.add_argument("--joint-depth", type=int, help="blocks of the joint encoder (default 1)")
    p.add_argument("--mlp-ratio", type=float, help="MLP width / model width (default 2)")
    p.add_argument("--token-merge", type=int,
                   help="embed k adjacent patches of a node as one token: attention over k times fewer tokens, "
                        "k^2 less attention work (default 1; must divide every modality's tokens per node)")
    p.add_argument("--message-loss", type=float, default=None,
                   help="loss-robust distillation: the student sees each token message lost with a probability "
                        "drawn from U(0, this) per batch, the teacher the complete window (default 0)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("choose-teacher", help="pick frozen heads or full fine-tuning by validation metrics",
                       description="Compare candidate teachers (each a set of fine-tuned checkpoints sharing one "
                                   "encoder, one per task) on their validation metrics and print the chosen "
                                   "candidate's checkpoints, one per line.")
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                   help="a candidate: its name and its fine-tuned run directories (repeat per candidate)")
    p.add_argument("--report", help="write the comparison as Markdown here")

    p = sub.add_parser("onnx", help="export encoder + heads as one ONNX graph with a manifest",
                       description="Export fine-tuned checkpoints (sharing one encoder) or a distilled student as "
                                   "one ONNX graph (dynamic batch and node count, opset >= 17), check it against "
                                   "torch at several node counts, and with --data score both on the validation "
                                   f"windows ({_ONNX.report}). Writes {_ONNX.file} and {_ONNX.manifest}, and "
                                   f"{_PLAIN.file} with {_PLAIN.manifest} when the attention is one TensorRT "
                                   "cannot parse.")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint (repeat for several heads)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", help="dataset for the parity check and the manifest's metric")
    p.add_argument("--name", default="spar-model", help="model name in the manifest")
    p.add_argument("--version", default="0.1.0", help="model version in the manifest")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--max-windows", type=int, help="use only the first N windows of --data")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=DEFAULT_ATTENTION,
                   help="how attention is written: mha = ONNX Runtime's MultiHeadAttention contrib op (default: "
                        "fastest here, benchmarks/results/quant.md), attention23 = ONNX Attention (opset 23), "
                        "ort-fusion = dynamo exporter + onnxscript's ORT fusion rewriter (needs onnxscript), plain = "
                        "split MatMul/Softmax (every TensorRT 10 parses it)")
    p.add_argument("--no-plain", action="store_true",
                   help=f"do not write {_PLAIN.file} (the split-attention graph TensorRT is built from)")

    p = sub.add_parser("quantize", help="INT8 Q/DQ ONNX calibrated on real windows",
                       description="Static INT8 quantization (Q/DQ, S8S8, per-channel weights; LayerNorm, Softmax, "
                                   "residual adds and regression outputs stay float) calibrated on real windows; "
                                   "--method auto measures MinMax, Percentile and Entropy and keeps the best. "
                                   f"Writes {_INT8.file}, its manifest and {_INT8.report} (from {_PLAIN.file}: "
                                   f"{_INT8_PLAIN.file} and {_INT8_PLAIN.report}), and the dynamic INT8 graph "
                                   "beside it for comparison.")
    p.add_argument("--onnx", required=True, help=f"FP32 {_ONNX.file} (its {_ONNX.manifest} beside it)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help=f"the checkpoint(s) {_ONNX.file} was exported from (the torch reference of the parity "
                        "report)")
    p.add_argument("--data", required=True, help="dataset: calibration windows from its training part, evaluation "
                                                 "on its validation part")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--out", help=f"INT8 file (default: {int8_name(_ONNX.file)} for {_ONNX.file}, "
                                 "<stem>.int8.onnx for any other input, beside it)")
    p.add_argument("--method", default="auto", choices=["auto", "minmax", "percentile", "entropy"])
    p.add_argument("--calibration-windows", type=int, default=128)

    p = sub.add_parser("engine", help="build a TensorRT engine (needs tensorrt and a GPU)",
                       description=f"Build a serialized TensorRT engine from {_PLAIN.file} (fp16) or the Q/DQ "
                                   f"{_INT8_PLAIN.file} (int8), with an optimisation profile over the site's node "
                                   "range. Engines are tied to the TensorRT version and GPU: build on the Jetson.")
    p.add_argument("--onnx", required=True, help="ONNX file with its manifest beside it")
    p.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16")
    p.add_argument("--out", help=f"engine file (default beside the ONNX: {engine_name(_PLAIN.file, 'fp16')} from "
                                 f"{_PLAIN.file}, {engine_name(_INT8_PLAIN.file, 'int8')} from "
                                 f"{_INT8_PLAIN.file})")
    p.add_argument("--nodes", type=int, help="typical node count of the site (profile optimum)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the profile (default 8)")
    p.add_argument("--timing-cache", help="tactic timing cache file (loaded when present, saved after the build)")
    return parser


def _cmd_distill(args) -> int:
    from export.distill import DEFAULT_STUDENT, DistillConfig, run_distill

    given = (("epochs", args.epochs), ("seed", args.seed), ("device", args.device),
             ("message_loss", args.message_loss))
    changes = {k: v for k, v in given if v is not None}
    shape = {name: getattr(args, name) for name in ("dim", "heads", "modality_depth", "joint_depth", "mlp_ratio",
                                                    "token_merge")}
    if any(v is not None for v in shape.values()):
        changes["student"] = {**DEFAULT_STUDENT, **{k: v for k, v in shape.items() if v is not None}}
    cfg = DistillConfig(teacher=list(args.teacher), data=args.data, out=args.out, progress=not args.no_progress,
                        **changes)
    result = run_distill(cfg)
    print(Path(result.report).read_text() if getattr(result, "report", None) else result)
    return 0


def _cmd_choose_teacher(args) -> int:
    from export.teacher_choice import run_choice

    winner = run_choice(args.candidate, args.report)
    print(f"chose {winner.name}", file=sys.stderr)
    for path in winner.checkpoints:
        print(path)
    return 0


def _cmd_onnx(args) -> int:
    from export.exporter import export_checkpoints

    result = export_checkpoints(args.checkpoint, args.out, name=args.name, version=args.version, data=args.data,
                                opset=args.opset, max_windows=args.max_windows, attention=args.attention,
                                plain=not args.no_plain)
    if result.parity is not None:
        print(result.parity.to_markdown("torch FP32", f"ONNX Runtime FP32 ({result.attention} attention)"))
    print(f"wrote {result.onnx} and {result.manifest} ({result.attention} attention)")
    if result.plain is not None:
        print(f"wrote {result.plain} and {result.plain_manifest} (plain attention, for TensorRT)")
    return 0


def _cmd_quantize(args) -> int:

    from export.exporter import load_deployable
    from export.quant_calibration import calibration_indices
    from export.quantize import quantize
    from train.data import load_windows, temporal_split

    model, _ = load_deployable(args.checkpoint)
    windows = load_windows(args.data, progress=False)
    train_idx, val_idx = temporal_split(len(windows), args.val_fraction)
    calib = calibration_indices(train_idx, args.calibration_windows)
    onnx_path = Path(args.onnx)
    out = Path(args.out) if args.out else onnx_path.with_name(int8_name(onnx_path.name))
    report = quantize(onnx_path, out, windows, calib, val_idx, model, method=args.method)
    print(report.to_markdown())
    return 0


def _cmd_engine(args) -> int:
    from export.tensorrt_engine import EngineSpec, build_engine, engine_summary

    spec = EngineSpec(precision=args.precision, batch=(1, 1, args.max_batch), site_nodes=args.nodes,
                      timing_cache=args.timing_cache)
    path = build_engine(Path(args.onnx), Path(args.out) if args.out else None, spec)
    summary = engine_summary(path)
    print(f"wrote {path} (TensorRT {summary.get('tensorrt_version', '?')}, "
          f"{summary.get('build_seconds', float('nan')):.0f} s) and its manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"distill": _cmd_distill, "choose-teacher": _cmd_choose_teacher, "onnx": _cmd_onnx,
                "quantize": _cmd_quantize, "engine": _cmd_engine}
    try:
        return commands[args.command](args)
    except ExportError as exc:
        print(f"spar-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
