"""``mmfuse generate --checkpoint DIR --prompt "a red square" --out img.png [--num-images N --steps N
--guidance G --seed S --scheduler NAME]``, or without ``--out``: text.

``DIR`` is a model folder (``RUN/model`` of ``mmfuse train``, or one written by
``MMFusePipeline.save_pretrained``); a plain HF Llama / Qwen2 folder generates text. With ``--out``
the prompt becomes images through the family's pipeline (prefill once, classifier-free guidance,
the model folder's VAE) and PNGs are written: ``img.png`` for one image, ``img_0.png``, ``img_1.png``
... for several. Without it, the prompt is continued as text (greedy, or ``--temperature``) and the
new text is printed. ``--prompt-ids 3,5,1`` takes token ids instead of a string (and prints ids).

``--image in.png`` (repeatable) puts pictures in the prompt: ``mmfuse generate --checkpoint DIR --image
in.png --prompt "What digit is this?"`` prints the answer; with ``--out`` it edits:
``mmfuse generate --checkpoint DIR --image src.png --prompt "make it blue" --out edited.png``
(``--image-guidance``: the InstructPix2Pix image scale). Each image sits at an ``<image>``
placeholder of the prompt, in order; a prompt without placeholders takes its images first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mmfuse.engine.commands import CheckpointError, fail
from mmfuse.models.family import families



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a model folder (e.g. RUN/model of `mmfuse train`)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help='the prompt text, e.g. "a red square"')
    prompt.add_argument("--prompt-ids", help="the prompt as comma-separated token ids, e.g. 3,5,1")
    parser.add_argument("--out", help="write images to this PNG path (without it: generate text)")
    parser.add_argument("--image", action="append", metavar="PNG", help="a picture in the prompt (repeat for "
                        "several), at the prompt's <image> placeholders in order, or before its text when it has "
                        "none; with no --out the answer is printed")
    hooks = {name: spec.pipeline for name, spec in families().items()}
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's: " +
                        ", ".join(f"{n} {h.num_inference_steps}" for n, h in hooks.items()) + ")")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 1 (1 = off; default: the "
                        "family's: " + ", ".join(f"{n} {h.guidance_scale}" for n, h in hooks.items()) + ")")
    parser.add_argument("--image-guidance", type=float, help="editing (--image with --out): the guidance towards the "
                        "source image, >= 1, in the InstructPix2Pix form (default: the --guidance value, i.e. one "
                        "branch with everything against the unconditional one)")
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance (default none)")
    parser.add_argument("--scheduler", help="a diffusers scheduler: ddim, ddpm, euler, euler_a, heun, dpm++, unipc, "
                        "pndm, lms, flow_euler, flow_heun, or a class name (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="text: tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="text: 0 = greedy (default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _check(args: argparse.Namespace) -> None:
    """Everything that can be refused before weights load."""
    from mmfuse.models.family import family_for_model_type
    from mmfuse.models.hf_io import read_config

    path = Path(args.checkpoint)
    if not path.is_dir():
        raise ValueError(f"--checkpoint: no checkpoint folder at {path}")
    model_type = read_config(path).get("model_type")
    for image in args.image or []:
        if not Path(image).is_file():
            raise ValueError(f"--image: no image file at {image}")
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out}")
        if not out.parent.resolve().is_dir():
            raise ValueError(f"--out: no folder {out.parent}")
        if family_for_model_type(model_type) is None:
            raise ValueError(f"--checkpoint {path} holds a {model_type!r} model, which writes text, not images "
                             "(leave out --out)")
    for name, value, ok in (("--steps", args.steps, args.steps is None or args.steps >= 1),
                            ("--guidance", args.guidance, args.guidance is None or args.guidance >= 1),
                            ("--image-guidance", args.image_guidance,
                             args.image_guidance is None or args.image_guidance >= 1),
                            ("--num-images", args.num_images, args.num_images >= 1),
                            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0),
                            ("--temperature", args.temperature, args.temperature >= 0)):
        if not ok:
            rule = ">= 1 (1 = no guidance)" if name in ("--guidance", "--image-guidance") else ">= 0" if name in (
                "--max-new-tokens", "--temperature") else ">= 1"
            raise ValueError(f"{name} must be {rule}, got {value}")


def output_paths(out: str, n: int) -> list[Path]:
    """``out`` for one image; ``<stem>_<i>.png`` beside it for several."""
    path = Path(out)
    return [path] if n == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    from mmfuse.engine.config import ConfigError
    from mmfuse.engine.pipeline import MMFusePipeline, write_image
    from mmfuse.engine.run import resolve_device

    try:
        _check(args)
        ids = _ids(args.prompt_ids) if args.prompt_ids is not None else None
        pipe = MMFusePipeline.from_pretrained(args.checkpoint, device=resolve_device(args.device))
        prompt = dict(prompt=args.prompt) if ids is None else dict(prompt_ids=[ids])
        if args.out is None:
            new = pipe.generate_text(**prompt, images=args.image, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, seed=args.seed)[0]
            print(new if ids is None else ",".join(str(t) for t in ids + new))
            return 0
        images = pipe(**prompt, images=args.image, num_images_per_prompt=args.num_images,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      image_guidance_scale=args.image_guidance, negative_prompt=args.negative_prompt,
                      scheduler=args.scheduler, seed=args.seed).images
    except (ValueError, TypeError, ConfigError, CheckpointError) as exc:
        raise fail("generate", exc) from exc
    for image, path in zip(images, output_paths(args.out, len(images))):
        print(f"wrote {write_image(image, path)}")
    return 0
