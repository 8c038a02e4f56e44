"""Re-check a shard folder written by tools/make_shards.py against its manifest.

    python tools/verify_shards.py OUT [--no-decode] [--workers N]

Checks each shard's size and sha256, that its DALI index matches the tar byte for byte, that
every label is in range and every image decodes as a clean JPEG, that keys are unique, and that
the per-split and per-class counts equal the manifest's. Prints each problem; exits 1 if any.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.shards import ShardFormatError, verify_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder written by tools/make_shards.py")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the images (much faster)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel worker processes")
    args = parser.parse_args(argv)
    try:
        problems = verify_shards(args.out, decode=not args.no_decode, workers=args.workers)
    except ShardFormatError as e:
        print(f"verify_shards: error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{args.out}: {len(problems)} problems" if problems else f"{args.out}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
