"""The ``mmfuse`` command line: ``demo``, ``train``, ``generate``, ``bench``."""
from __future__ import annotations

import argparse
import sys

# Subcommands whose capability has not landed yet, with the issue that builds it.
_NOT_YET_BUILT = {
    "demo": "the embedded digits demo (issue 6)",
    "train": "the training engine (issue 6)",
    "generate": "generation and diffusion sampling (issue 6)",
    "bench": "the benchmark runner (issue 7); per-op scripts live in bench/, e.g. python -m mmfuse.bench.bench_attention",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in _NOT_YET_BUILT.items():
        sub.add_parser(name, help=what)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    what = _NOT_YET_BUILT[args.command]
    print(f"mmfuse {args.command}: not yet built: {what}.", file=sys.stderr)
    return 0
