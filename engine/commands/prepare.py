"""``mmfuse prepare --config run.json [--device cuda] [--batch-size N]``.

Encodes every picture of the run config's data once -- resized and cropped to the model's
resolution, through its VAE (or, for MetaMorph, its SigLIP preprocessing) -- into ``data.cache``
(safetensors shards and an index). ``mmfuse train`` with the same config then reads the cache instead
of the pictures; a cache made for another VAE or resolution is refused.
"""
from __future__ import annotations

import argparse

from mmfuse.engine.commands import CheckpointError, fail
from mmfuse.engine.config import ConfigError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config (JSON; see `mmfuse train --help`)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VAE call (default 16)")


def run(args: argparse.Namespace) -> int:
    from mmfuse.engine.prepare import prepare_from_config

    try:
        folder = prepare_from_config(args.config, args.device, args.batch_size)
    except (ConfigError, CheckpointError) as exc:
        raise fail("prepare", exc) from exc
    print(f"wrote {folder}")
    return 0
