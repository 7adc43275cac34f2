"""The ``mmfuse bench`` subcommand: its options and actions (what runs is :mod:`mmfuse.bench.run`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmfuse.bench import run as run_module

DESCRIPTION = run_module.__doc__


def _arg_type(convert):
    """An argparse ``type`` that reports ``convert``'s ValueError as the argument's error message."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = convert.__name__
    return parse


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(text)


# bench options and the actions they belong to (checked after parsing, so that a misplaced one is an error)
_BENCH_OPTION_ACTIONS = {"quick": ("run",), "only": ("run",), "device": ("run",), "threads": ("run",),
                         "tiny": ("run",), "out": ("run", "plot"), "results": ("plot", "report"),
                         "readme": ("report",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("run", "plot", "report"), default="run",
                        help="run the benchmarks (default), draw the plots, or write the markdown report")
    parser.add_argument("--quick", action="store_true",
                        help="run: the small sizes the README quotes (all modules in about 1.5 minutes on 2 CPU cores)")
    parser.add_argument("--only", metavar="NAMES", type=_arg_type(run_module.parse_only),
                        help=f"run: comma-separated modules out of: {', '.join(run_module.REGISTRY)}")
    parser.add_argument("--device", type=_arg_type(run_module.resolve_device),
                        help="run: cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--threads", metavar="N", type=_arg_type(_positive_int),
                        help="run: CPU threads (default torch's; 1 steadies timings on a shared machine)")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="run: results folder (default bench/results); plot: plots folder (default RESULTS/plots)")
    parser.add_argument("--results", metavar="DIR", type=Path,
                        help="plot, report: the results folder to read (default bench/results)")
    parser.add_argument("--readme", metavar="FILE", type=Path,
                        help="report: also rewrite FILE's section between <!-- perf:begin --> and <!-- perf:end -->")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy shapes, for the tests
    parser.set_defaults(bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    for option, actions in _BENCH_OPTION_ACTIONS.items():
        if getattr(args, option) not in (None, False) and args.action not in actions:
            args.bench_parser.error(f"--{option} applies to `mmfuse bench {'|'.join(actions)}`, not {args.action}")
    if args.action == "run":
        return run_module.run_benchmarks(quick=args.quick, only=args.only, device=args.device, out_dir=args.out,
                                        tiny=args.tiny, threads=args.threads)
    results = args.results or run_module.RESULTS_DIR
    if not results.is_dir():
        print(f"mmfuse bench {args.action}: error: no results folder {results}", file=sys.stderr)
        return 1
    try:
        if args.action == "plot":
            return _plot(results, args.out)
        return _report(results, args.readme)
    except (OSError, ValueError) as exc:
        print(f"mmfuse bench {args.action}: error: {exc}", file=sys.stderr)
        return 1


def _plot(results: Path, out: Path | None) -> int:
    from mmfuse.bench import plot

    try:
        written = plot.draw_all(results, out)
    except plot.MatplotlibMissing as exc:
        print(f"mmfuse bench plot: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot in {results}")
    return 0


def _report(results: Path, readme: Path | None) -> int:
    from mmfuse.bench import report

    print(report.write_summary(results))
    if readme is not None:
        changed = report.update_readme(readme, results)
        print(f"{readme}: performance section {'rewritten' if changed else 'already up to date'}")
    return 0
