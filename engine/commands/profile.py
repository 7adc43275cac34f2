"""``mmfuse profile --config run.json [--steps N] [--sample] [--out DIR] [--device cuda]``.

Runs a few training steps of the run config (after one warm-up step) under ``torch.profiler`` and
prints tokens/s and images/s, peak memory, each group's share of the step time (attention, GEMMs,
norms / RoPE / SwiGLU, losses, other, the optimizer, data loading and packing) and, on a GPU, MFU;
``--sample`` adds one generation through the family's pipeline, split into prefill / denoise / VAE
decode. Writes a Chrome / Perfetto trace (``trace.json``) and the table (``profile.json``) to
``--out`` (default: ``profile/`` beside the config). Nothing is saved of the model.
"""
from __future__ import annotations

import argparse

from mmfuse.engine.commands import CheckpointError, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config (JSON; see `mmfuse train --help`)")
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps after one warm-up step "
                        "(default 3)")
    parser.add_argument("--sample", action="store_true", help="also profile one generation through the pipeline")
    parser.add_argument("--out", help="where trace.json and profile.json go (default: profile/ beside the config)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def run(args: argparse.Namespace) -> int:
    from mmfuse.engine.config import ConfigError
    from mmfuse.engine.profile import format_report, profile_run

    if args.steps < 1:
        raise SystemExit("mmfuse profile: --steps must be >= 1")
    try:
        report = profile_run(args.config, args.steps, args.sample, args.out, args.device)
    except (ValueError, ConfigError, CheckpointError) as exc:
        raise fail("profile", exc) from exc
    print(format_report(report))
    return 0
