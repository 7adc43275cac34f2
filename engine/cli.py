"""The ``mmfuse`` command line: ``demo``, ``train``, ``generate``, ``bench``."""
from __future__ import annotations

import argparse
import sys

from mmfuse.engine import commands, demo

# Subcommands whose capability has not landed yet, with the issue that builds it.
_NOT_YET_BUILT = {
    "bench": "the benchmark runner (issue 7); per-op scripts live in bench/, e.g. python -m mmfuse.bench.bench_attention",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="a tiny Transfusion model learns captions <-> digits on CPU",
                                      description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    commands.add_train_arguments(sub.add_parser("train", help="train LlamaFusion / Transfusion from a JSON config",
                                                description=commands.__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    commands.add_generate_arguments(sub.add_parser("generate", help="generate text or an image from a checkpoint"))
    for name, what in _NOT_YET_BUILT.items():
        sub.add_parser(name, help=what)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demo.main(args)
    if args.command == "train":
        return commands.run_train(args)
    if args.command == "generate":
        return commands.run_generate(args)
    what = _NOT_YET_BUILT[args.command]
    print(f"mmfuse {args.command}: not yet built: {what}.", file=sys.stderr)
    return 0
