"""Exhaustive single-byte mutation of a sample's first bytes: every result must be features or a
typed ``InputError``, never another exception.

    python bench/fuzz_headers.py SAMPLE [--bytes 1024] [--values 0x80,0xff,0x00,0x7f,0x01]

Complements the random mutation property tests (tests/test_hostile.py) with a systematic sweep
of the header area, where most parser decisions are made. Prints each failure and a count.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from earmark.config import DEFAULT_LIMITS
from earmark.errors import InputError
from earmark.extract import analyze_bytes


def sweep(data: bytes, span: int, values: list[int], shown: int = 5) -> int:
    """Number of (position, value) mutations that raised something other than InputError."""
    failures = 0
    for position in range(min(span, len(data))):
        for value in values:
            mutated = bytearray(data)
            mutated[position] = value
            try:
                analyze_bytes(bytes(mutated), DEFAULT_LIMITS)
            except InputError:
                continue
            except Exception as error:  # the point of the sweep: report any other failure
                failures += 1
                if failures <= shown:
                    print(f"offset {position} := {value:#04x}: {type(error).__name__}: {error}")
                    traceback.print_exc(limit=-3)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample", type=Path)
    parser.add_argument("--bytes", type=int, default=1024, help="how many leading bytes to mutate")
    parser.add_argument("--values", default="0x80,0xff,0x00,0x7f,0x01")
    args = parser.parse_args(argv)
    values = [int(v, 0) for v in args.values.split(",")]
    failures = sweep(args.sample.read_bytes(), args.bytes, values)
    print(f"{failures} mutations raised something other than a typed input error")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
