"""`spar-train`: command-line entry point. Its subcommands arrive with the train/ issue."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spar-train",
        description="spar-edge train tools. No subcommands are available in this release yet; "
        "see the README's roadmap.",
    )
    parser.parse_args(argv)
    print("spar-train: no subcommands are available in this release yet (see README, Roadmap)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
