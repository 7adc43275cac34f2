"""The ``mmfuse`` command line: ``demo``, ``train``, ``prepare``, ``generate``, ``profile``, ``bench``.

Each subcommand is one module with ``add_arguments(parser)`` and ``run(args) -> exit code``; its
``DESCRIPTION`` (default: its docstring) is its ``--help`` text, and its one-line summary is listed
here. Only the subcommand being run is imported, so ``mmfuse --help`` starts without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (its module, its one-line help), in the order ``mmfuse --help`` lists them
SUBCOMMANDS = {
    "demo": ("mmfuse.engine.demo", "a tiny Transfusion model learns captions <-> digits on CPU (PNGs + captions -> "
                                   "train -> PNGs)"),
    "train": ("mmfuse.engine.commands.train", "train LlamaFusion / Transfusion, MetaMorph or MetaQuery from "
                                              "captioned images and a base checkpoint"),
    "prepare": ("mmfuse.engine.commands.prepare", "encode a run's images once into a cache of latents (safetensors) "
                                                  "that training reads"),
    "generate": ("mmfuse.engine.commands.generate", "generate images (PNG) or text from a trained model folder"),
    "profile": ("mmfuse.engine.commands.profile", "profile a few training steps of a run config (time by group, "
                                                  "throughput, memory; a Chrome trace)"),
    "bench": ("mmfuse.bench.cli", "benchmarks vs the baselines users would otherwise run; plots, report"),
}
DESCRIPTION = ("Fast kernels and an engine for unified multimodal transformers (LlamaFusion / Transfusion, "
               "MetaMorph, MetaQuery). `mmfuse COMMAND --help` documents each command.")


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``commands`` (default: all of them; the others are listed only)."""
    commands = list(SUBCOMMANDS) if commands is None else commands
    parser = argparse.ArgumentParser(prog="mmfuse", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name not in commands:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", module.__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([chosen] if chosen in SUBCOMMANDS else []).parse_args(argv)
    return args.run(args)
