"""Triage after a failed ``spar-bench fuzz`` run: replay its messages through the wire parsers in
this process, and save one reproducer per class, variant and problem.

The aggregator only reports counts; this finds which messages were behind an ``internal_error`` or
an accepted hostile message, so a failure comes with payloads to debug against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.fuzz_classes import BASE_EPOCH_NS, VALID, FuzzMessage
from benchmarks.fuzz_config import FuzzConfig
from benchmarks.fuzz_generator import FuzzGenerator
from spar_wire.errors import WireError
from spar_wire.message import decode_message
from spar_wire.site_layout import SiteLayout


def local_verdict(message: FuzzMessage) -> str | None:
    """What the wire parsers make of a message in this process, when it is a problem.

    "escapes: <exception>" for anything but WireError (the aggregator counts that as internal_error);
    "accepted, image not finite" for a token frame that decodes to +-inf/NaN values. None otherwise.
    """
    import numpy as np

    from spar_wire.lifecycle import parse_birth, parse_state

    kind = message.topic.rsplit("/", 2)
    try:
        if kind[-1] == "birth":
            parse_birth(message.payload)
        elif kind[-1] == "state":
            parse_state(message.payload)
        elif kind[-2] == "data" and not np.all(np.isfinite(decode_message(message.payload).image())):
            return "accepted, image not finite"
    except WireError:
        return None
    except Exception as exc:  # noqa: BLE001 - what escapes is exactly what we are looking for
        return f"escapes: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def triage(layout: SiteLayout, config: FuzzConfig, folder: Path, epoch_ns: int = BASE_EPOCH_NS
           ) -> list[dict[str, Any]]:
    """Replay the run's messages through the wire parsers in this process: one reproducer per class,
    variant and problem, its payload saved under ``folder``. The generator is deterministic from the
    run's seed and first window start (``epoch_ns``), so these are messages the aggregator received,
    except for window starts: the run's followed the wall clock, the replay's advance one window per
    valid block."""
    import warnings

    found: dict[tuple[str, str, str], FuzzMessage] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warnings are the point here
        generator = FuzzGenerator(layout, config.seed, epoch_ns=epoch_ns)
        for _, message in generator.messages(config.messages, config.block_size):
            verdict = None if message.cls == VALID else local_verdict(message)
            if verdict:
                found.setdefault((message.cls, message.variant, verdict), message)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for (cls, variant, verdict), message in found.items():
        path = folder / f"{cls}-{variant}.bin"
        path.write_bytes(message.payload)
        out.append({"class": cls, "variant": variant, "problem": verdict, "topic": message.topic,
                    "payload_bytes": len(message.payload), "payload_head": message.payload[:48].hex(),
                    "file": str(path)})
    return out
