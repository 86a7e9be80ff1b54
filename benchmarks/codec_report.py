"""Per-codec size and round-trip error on one window of each modality of a site."""

from __future__ import annotations

from node_firmware_sim.sine_source import sine_window
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.message import RoundTrip, measure_roundtrip
from spar_wire.site_layout import SiteLayout


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
    lines = []
    for modality, rows in report.items():
        reference = next((r.frame_bytes for r in rows if r.codec == "raw32"), None)
        lines.append(f"\n{modality}")
        lines.append(f"  {'codec':<15}{'bytes':>8}{'% raw32':>9}{'max err dB':>12}{'rmse dB':>9}")
        for r in rows:
            share = f"{100 * r.frame_bytes / reference:8.1f}%" if reference else f"{'-':>9}"
            lines.append(f"  {r.codec:<15}{r.frame_bytes:>8}{share}{r.max_abs_error:>12.3f}{r.rmse:>9.3f}")
    return "\n".join(lines).lstrip("\n")
