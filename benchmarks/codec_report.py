"""Per-codec size and round-trip error on one window of each modality of a site (``spar-bench
codecs``, added by ``register``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.cli_support import DEFAULT_SITE
from node_firmware_sim.sine_source import sine_window
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.message import RoundTrip, measure_roundtrip
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.machine import describe_machine


def codec_report(layout: SiteLayout, specs: list[CodecSpec]) -> dict[str, list[RoundTrip]]:
    """Modality -> one RoundTrip per codec, on a sine window of the site's first node."""
    node = layout.nodes[0]
    out = {}
    for name in node.modalities:
        cfg = layout.modalities[name].features
        image = compute_token_image(sine_window(cfg, node.id, start_s=0.0), cfg)
        out[name] = [measure_roundtrip(image, cfg, spec) for spec in specs]
    return out


def format_codec_report(report: dict[str, list[RoundTrip]]) -> str:
    """The report as a fixed-width text table per modality (sizes against raw32)."""
    lines = []
    for modality, rows in report.items():
        reference = next((r.frame_bytes for r in rows if r.codec == "raw32"), None)
        lines.append(f"\n{modality}")
        lines.append(f"  {'codec':<15}{'bytes':>8}{'% raw32':>9}{'max err dB':>12}{'rmse dB':>9}")
        for r in rows:
            share = f"{100 * r.frame_bytes / reference:8.1f}%" if reference else f"{'-':>9}"
            lines.append(f"  {r.codec:<15}{r.frame_bytes:>8}{share}{r.max_abs_error:>12.3f}{r.rmse:>9.3f}")
    return "\n".join(lines).lstrip("\n")


# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench codecs`` to ``subparsers`` (``parser.add_subparsers()``)."""
    cd = subparsers.add_parser(
        "codecs", help="round-trip error and size of every codec on a sample window",
        description="For each modality of a site, encode one sine window with every "
        "codec and report bytes on the wire and the round-trip error in dB.")
    cd.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    cd.add_argument("--codecs", default="raw32,raw,png,webp:lossless,webp:95,webp:85,webp:75,webp:50,"
                    "jpeg:95,jpeg:85,jpeg:75,jpeg:50", help="comma-separated codec list")
    cd.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    cd.set_defaults(func=_cmd_codecs)


def _cmd_codecs(args: argparse.Namespace) -> int:
    layout = load_site_layout(args.site)
    specs = [CodecSpec.parse(text) for text in args.codecs.split(",") if text.strip()]
    text = format_codec_report(codec_report(layout, specs))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Codec round trip on one sine window per modality (`spar-bench codecs`)\n\n"
                            f"{describe_machine()} · site {layout.site_id}\n\n```\n{text}\n```\n")
        print(f"report: {args.out}")
    return 0
