"""Real miniSEED recordings that ship inside obspy, mapped onto stations of the ridgecrest-like site,
so a replay of real data runs on a fresh clone with nothing downloaded.

``python -m node_firmware_sim.obspy_recordings OUT.toml`` writes a recordings file (see
``node_firmware_sim.scenarios.recording_replay``) with absolute paths into the installed obspy:

* CLC: a three-component broadband record (BHE/BHN/BHZ at 150 Hz, 71 s; obspy's SEISAN tests);
* SRT: a vertical-only station (BHZ, 40 Hz): its E and N channels replay flat;
* TOW2: the same vertical station's file whose last record is corrupt: obspy skips the broken bytes,
  the replay warns once and goes on with what could be read;
* WBM: a single east component (EHE, 200 Hz): N and Z replay flat;
* JRC2: a vertical-only station (BHZ, 50 Hz, 80 s).

Every file is resampled to the site's 100 Hz. The other eleven stations have no recording and send
nothing (missing traces). They are test records from several networks and years, not one event:
the replay exercises the data path (rates, components, corrupt records, alignment, the aggregator
and the model), and a location computed from them means nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node_firmware_sim.errors import NodeError

# station of the ridgecrest-like site -> (file under obspy's package folder, components to replay)
EXAMPLES: dict[str, tuple[str, str]] = {
    "CLC": ("io/seisan/tests/data/2005-07-23-1452-04S.CER___030.mseed", "ENZ"),
    "SRT": ("io/mseed/tests/data/test.mseed", "ENZ"),
    "TOW2": ("io/mseed/tests/data/brokenlastrecord.mseed", "ENZ"),
    "WBM": ("io/mseed/tests/data/timingquality.mseed", "ENZ"),
    "JRC2": ("io/seisan/tests/data/2011-09-06-1311-36S.A1032_001BH_Z.mseed", "ENZ"),
}


def obspy_folder() -> Path:
    try:
        import obspy
    except ImportError:
        raise NodeError("the example recordings ship with obspy: pip install 'spar-edge[replay]'") from None
    return Path(obspy.__file__).resolve().parent


def write_example_recordings(out: str | Path, modality: str = "seismometer") -> Path:
    """Write the recordings TOML to ``out``; NodeError when obspy or one of its files is missing."""
    root = obspy_folder()
    lines = ["# Real miniSEED records shipped inside obspy, on stations of configs/sites/ridgecrest_like.toml",
             "# (written by python -m node_firmware_sim.obspy_recordings)."]
    for node, (relative, components) in EXAMPLES.items():
        path = root / relative
        if not path.exists():
            raise NodeError(f"obspy {root} has no {relative}; these examples need obspy >= 1.4")
        lines += ["", "[[recordings]]", f'node = "{node}"', f'modality = "{modality}"', f'path = "{path}"',
                  f'components = "{components}"']
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node_firmware_sim.obspy_recordings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="recordings TOML to write")
    args = parser.parse_args(argv)
    try:
        path = write_example_recordings(args.out)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {', '.join(EXAMPLES)} (replay it with spar-trial run --scenario earthquakes "
          f"--recordings {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
