"""The ``mmfuse`` command line: ``demo``, ``train``, ``prepare``, ``generate``, ``bench``.

Each subcommand is one module with ``HELP`` (its one-line summary), ``add_arguments(parser)`` and
``run(args) -> exit code``; its ``DESCRIPTION`` (default: its docstring) is its ``--help`` text.
"""
from __future__ import annotations

import argparse
import importlib

# subcommand -> its module, in the order ``mmfuse --help`` lists them
SUBCOMMANDS = {
    "demo": "mmfuse.engine.demo",
    "train": "mmfuse.engine.commands.train",
    "prepare": "mmfuse.engine.commands.prepare",
    "generate": "mmfuse.engine.commands.generate",
    "bench": "mmfuse.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Fast kernels and an engine for unified multimodal "
                                     "transformers (LlamaFusion / Transfusion, MetaMorph, MetaQuery).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
