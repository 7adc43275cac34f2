"""``mmfuse train --config run.json [--resume [PATH]] [--device cuda]``.

Trains a family's model from a JSON run config. The run folder (``train.out_dir``, default ``run/``
beside the config) gets atomic checkpoints (``step_*/`` + ``latest``), ``train_log.jsonl`` and, at the
end, ``model/``: the model folder ``mmfuse generate --checkpoint RUN/model`` and
``MMFusePipeline.from_pretrained`` read (model, tokenizer, VAE, scheduler). An existing run folder is
never overwritten: ``--resume`` continues it from its latest checkpoint (or ``--resume PATH`` from a
given one) and reproduces the uninterrupted run's losses exactly. Under ``torchrun`` it trains with DDP,
or FSDP2 with ``"train": {"data_parallel": "fsdp"}``.

Example -- LlamaFusion from a Llama checkpoint on a folder of captioned PNGs::

    {"family": "fusion", "base": "Llama-3.2-1B", "vae": "sd-vae-ft-mse",
     "fusion": {"latent_size": 32, "patch_size": 2},
     "data": {"path": "captions.jsonl", "row_len": 2048, "rows_per_batch": 4},
     "train": {"steps": 20000, "lr": 1e-4, "checkpoint_every": 1000}}

with captions.jsonl holding lines like {"text": "a red square", "image": "img/0.png"}.
"""
from __future__ import annotations

import argparse
import textwrap

from mmfuse.engine import config as config_module
from mmfuse.engine.commands import CheckpointError, describe_fields, fail
from mmfuse.engine.config import ConfigError, DataConfig
from mmfuse.engine.train import TrainConfig, rank_and_world
from mmfuse.models import DecoderConfig
from mmfuse.models.family import families



def _description() -> str:
    schema = config_module.__doc__.split("::", 1)[1]
    sections = [__doc__.rstrip(), "\nThe run config:" + schema.rstrip()]
    for spec in families().values():
        parts = "".join(f', "{p}"' for p in spec.parts)
        sections.append(f'\nfamily "{spec.name}" ({spec.description}); keys "{spec.name}"{parts}:\n'
                        + describe_fields(spec.config_class))
    sections += ["\ndata:\n" + describe_fields(DataConfig),
                 "\n" + textwrap.indent(textwrap.dedent((DataConfig.__doc__ or "").split("Attributes:", 1)[1]).strip(), "    "),
                 "\ntrain:\n" + describe_fields(TrainConfig),
                 "\ndecoder (an LLM from scratch):\n" + describe_fields(DecoderConfig)]
    return "\n".join(sections)


DESCRIPTION = _description()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config (JSON; see above)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue the run folder's latest checkpoint (or the checkpoint at PATH)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def run(args: argparse.Namespace) -> int:
    from mmfuse.engine.run import train_from_config

    try:
        out = train_from_config(args.config, args.device, resume=args.resume)
    except (ConfigError, CheckpointError, FloatingPointError) as exc:
        raise fail("train", exc) from exc
    if rank_and_world()[0] == 0:
        print(f"trained; the model is in {out / 'model'} (checkpoints and train_log.jsonl in {out})")
    return 0
