"""``mmfuse demo``: a tiny Transfusion model learns captions <-> handwritten digits, along the user's path.

Data: scikit-learn's digits (1,797 8x8 images that ship inside the package, no download). The demo
first writes them as a folder a user would bring -- ``DATA/img/*.png``, three JSONL files of text
(``understand.jsonl``: image -> digit, ``draw.jsonl``: caption -> image, ``edit.jsonl``: image +
instruction -> another image; mixed 2:2:1 in every batch), a word-level tokenizer and a run config
``DATA/run.json`` -- then trains exactly as ``mmfuse prepare`` and ``mmfuse train --config
DATA/run.json`` do (pixel-space diffusion: each 8x8 picture is its own 1 x 8 x 8 "latent", 16 patches
of 2 x 2; ``prepare`` reads every PNG once into ``DATA/cache``). Three kinds of documents, packed
into rows and trained together with LM cross-entropy + 5 x DDPM noise-prediction MSE:

* understanding  ``caption BOI [clean image] EOI <digit>``  (the image conditions the text)
* generation     ``draw <digit> BOI [noised image] EOI``    (the caption is dropped 10% of the time,
  which trains the unconditional branch of classifier-free guidance)
* editing        ``BOI [clean source] EOI make <digit> BOI [noised target] EOI`` (a digit of the
  asked-for class, never the source's)

Afterwards, on held-out digits: caption accuracy (the answer ``generate_text`` gives for the prompt
``caption <image>`` with the held-out picture in it -- the path ``mmfuse generate --image`` takes),
generation accuracy (the share of digits that the pipeline draws for "draw 0" ... "draw 9" which an
independent classifier, trained on the real digits, reads as the requested class) and editing
accuracy (the share of held-out digits edited by ``<image> make <digit>`` that it reads as the asked-for
digit). Writes ``samples.png``, ``edits.png`` (source, edit, source, edit ...), ``loss.png`` and
``metrics.json`` to ``--out``; the trained model folder is ``OUT/run/model`` (try ``mmfuse generate
--checkpoint OUT/run/model --prompt "draw 7" --out 7.png``, ``mmfuse generate --checkpoint OUT/run/model
--image OUT/data/img/00000.png --prompt "caption <image>"`` and ``... --prompt "<image> make 3" --out 3.png``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmfuse.engine.pipeline import MMFusePipeline, image_grid, write_image
from mmfuse.engine.prepare import prepare_from_config
from mmfuse.engine.run import resolve_device, train_from_config
from mmfuse.engine.text import word_tokenizer

WORDS = ["<pad>", "<boi>", "<eoi>", "caption", "draw", "make", *"0123456789", "<unk>"]
ROW_LEN = 80  # four 20-position documents per row
FAMILY = "fusion"


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(train_x, train_y, test_x, test_y): images (N, 1, 8, 8) in [-1, 1], labels (N,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is an install requirement
        raise RuntimeError("the demo needs scikit-learn (pip install scikit-learn)") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def run_config(steps: int, seed: int, workers: int) -> dict:
    """The run config the demo trains with (written to DATA/run.json)."""
    return {
        "family": FAMILY,
        "decoder": {"vocab_size": len(WORDS), "dim": 128, "hidden_dim": 384, "num_layers": 4, "num_heads": 4,
                    "num_kv_heads": 2, "head_dim": 32, "tie_embeddings": True},
        "tokenizer": "tokenizer",
        "vae": "pixels",
        FAMILY: {"latent_channels": 1, "latent_size": 8, "patch_size": 2, "train_text": True,
                 "beta_schedule": "squaredcos_cap_v2", "timestep_dim": 128},
        # understanding, generation and editing documents, 2:2:1 in every batch (a mixture of three files)
        "data": {"path": [{"path": "understand.jsonl", "weight": 2}, {"path": "draw.jsonl", "weight": 2},
                          {"path": "edit.jsonl", "weight": 1}],
                 "row_len": ROW_LEN, "rows_per_batch": 10, "num_workers": workers, "caption_dropout": 0.1,
                 "cache": "cache"},
        "train": {"steps": steps, "lr": 2e-3, "warmup_steps": min(100, steps // 10 + 1), "min_lr_ratio": 0.05,
                  "weight_decay": 0.01, "grad_clip": 1.0, "seed": seed, "log_every": 10, "ema_decay": 0.995,
                  "out_dir": "../run"},
    }


def edit_targets(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A target digit for each source digit, never its own class."""
    shift = torch.randint(1, 10, (len(labels),), generator=torch.Generator().manual_seed(seed + 1))
    return (labels + shift) % 10


def export_data(folder: Path, images: torch.Tensor, labels: torch.Tensor, config: dict, seed: int = 0) -> Path:
    """Write the digits as a user's data folder: PNGs, captions (JSONL), tokenizer, run config."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    understand, draw, edit = [], [], []
    names = [f"img/{i:05d}.png" for i in range(len(labels))]
    by_class = {d: (labels == d).nonzero().flatten().tolist() for d in range(10)}
    pick = torch.Generator().manual_seed(seed + 2)
    for i, (picture, label, target) in enumerate(zip(digit_pictures(images), labels.tolist(),
                                                     edit_targets(labels, seed).tolist())):
        picture.save(folder / names[i])
        understand.append(json.dumps({"segments": [{"text": "caption"}, {"image": names[i], "diffuse": False},
                                                   {"text": str(label)}]}))
        draw.append(json.dumps({"text": f"draw {label}", "image": names[i]}))
        other = by_class[target][int(torch.randint(len(by_class[target]), (1,), generator=pick))]
        edit.append(json.dumps({"segments": [{"image": names[i], "diffuse": False}, {"text": f"make {target}"},
                                             {"image": names[other]}]}))
    for name, lines in (("understand", understand), ("draw", draw), ("edit", edit)):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    word_tokenizer(WORDS[3:-1]).save_pretrained(str(folder / "tokenizer"))  # ids as WORDS: the decoder's vocabulary
    (folder / "run.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / "run.json"


def digit_pictures(images: torch.Tensor) -> list:
    """(N, 1, 8, 8) digits in [-1, 1] -> grayscale 8x8 PIL pictures (what the PNG files hold)."""
    from PIL import Image as PILImage

    pixels = ((images[:, 0] + 1) / 2 * 255).round().to(torch.uint8).numpy()
    return [PILImage.fromarray(array, mode="L") for array in pixels]


def caption_accuracy(pipe: MMFusePipeline, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of held-out pictures the model captions with the right digit: the prompt
    ``caption <image>`` with the picture in it, through ``generate_text`` (one greedy token)."""
    answers = pipe.generate_text(["caption <image>"] * len(labels), images=digit_pictures(images), max_new_tokens=1)
    return sum(a.strip() == str(int(y)) for a, y in zip(answers, labels)) / len(labels)


def edit_digits(pipe: MMFusePipeline, sources: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out digits edited by the prompt ``<image> make <target>``: (sources, edits, targets)."""
    targets = edit_targets(labels, seed + 100)
    edits = pipe([f"<image> make {t}" for t in targets.tolist()], images=[[p] for p in digit_pictures(sources)],
                 num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="latent").images
    return sources, edits.clamp(-1, 1).cpu(), targets


def read_as(clf, images: torch.Tensor, wanted: torch.Tensor) -> float:
    """The share of (N, 1, 8, 8) pictures the classifier reads as their wanted digit."""
    return float((torch.tensor(clf.predict(images.reshape(len(wanted), -1).numpy())) == wanted).float().mean())


def enlarged(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """[-1, 1] pictures -> [0, 1], enlarged ``factor`` x (nearest) so a grid of 8x8 digits is readable."""
    return (images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) + 1) / 2


def digit_classifier(images, labels):
    """An independent reader of digits: logistic regression on the real training images' pixels."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(images.reshape(len(labels), -1).numpy(), labels.numpy())
    return clf


def save_loss_curve(history: list[dict], path: Path) -> None:
    """Total, LM and diffusion loss per step as a PNG line chart (drawn with PIL, no plotting library)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    width, height, pad = 640, 360, 40
    img = PILImage.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = {"loss": (30, 30, 30), "lm": (40, 90, 200), "diffusion": (200, 70, 40)}
    top = max(max(r.get(k, 0.0) for r in history) for k in series) or 1.0
    n = max(1, len(history) - 1)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline=(180, 180, 180))
    for i, (key, color) in enumerate(series.items()):
        points = [(pad + (width - 1.5 * pad) * j / n, height - pad - (height - 1.5 * pad) * r[key] / top)
                  for j, r in enumerate(history) if key in r]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((pad + 10 + 110 * i, height - pad + 12), key, fill=color)
    draw.text((4, pad // 2), f"{top:.2f}", fill=(0, 0, 0))
    draw.text((4, height - pad - 6), "0", fill=(0, 0, 0))
    draw.text((width - 3 * pad, height - pad + 12), f"{len(history)} steps", fill=(0, 0, 0))
    img.save(path)


def run_demo(steps: int = 1200, out: str | Path = "mmfuse-demo", device: str = "cpu", seed: int = 0,
             per_class: int = 10, sample_steps: int = 50, guidance: float = 3.0, workers: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    config_file = export_data(out / "data", train_x, train_y, run_config(steps, seed, workers), seed)
    prepare_from_config(config_file, device, batch_size=256, progress=False)  # every picture encoded once
    t0 = time.perf_counter()
    run = train_from_config(config_file, device, progress=None)
    train_s = time.perf_counter() - t0
    history = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    pipe = MMFusePipeline.from_pretrained(run / "model", device=device)
    caption_acc = caption_accuracy(pipe, test_x, test_y)
    t1 = time.perf_counter()
    drawn = pipe([f"draw {d}" for d in range(10)], num_images_per_prompt=per_class, num_inference_steps=sample_steps,
                 guidance_scale=guidance, seed=seed, output_type="latent", progress=None).images
    sample_s = time.perf_counter() - t1
    generated = drawn.clamp(-1, 1).cpu()  # pixel space: the latents are the pictures, in [-1, 1]
    wanted = torch.arange(10).repeat_interleave(per_class)
    clf = digit_classifier(train_x, train_y)
    real_acc = float(clf.score(test_x.reshape(len(test_y), -1).numpy(), test_y.numpy()))
    gen_acc = read_as(clf, generated, wanted)
    # 8x8 digits enlarged 4x (nearest) so the grid is readable: one row per class.
    write_image(image_grid(enlarged(generated), nrow=per_class), out / "samples.png")
    sources, edited, targets = edit_digits(pipe, test_x[:10 * per_class], test_y[:10 * per_class], sample_steps,
                                           guidance, seed)
    edit_acc = read_as(clf, edited, targets)
    pairs = torch.stack([sources, edited], dim=1).flatten(0, 1)  # source, edit, source, edit, ...
    write_image(image_grid(enlarged(pairs), nrow=2 * per_class), out / "edits.png")
    save_loss_curve(history, out / "loss.png")
    last = history[-1]
    metrics = {
        "steps": steps,
        "train_seconds": train_s,
        "tokens_per_s": last.get("tokens_per_s"),
        "images_per_s": last.get("images_per_s"),
        "final_loss": {k: last[k] for k in ("loss", "lm", "diffusion") if k in last},
        "caption_accuracy": caption_acc,
        "generation_accuracy": gen_acc,
        "editing_accuracy": edit_acc,
        "classifier_accuracy_on_real_test_digits": real_acc,
        "sampling_seconds": sample_s,
        "images_generated": len(wanted),
        "model_parameters": sum(p.numel() for p in pipe.model.parameters()),
        "model_folder": str(run / "model"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--out", default="mmfuse-demo", help="output folder (default ./mmfuse-demo); a new one "
                        "each time (an existing run inside is not overwritten)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=10, help="generated digits per class (default 10)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per image (default 50)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0: the "
                        "documents are small, and on 2 cores a worker slows the training step more than it saves)")


def run(args: argparse.Namespace) -> int:
    from mmfuse.engine.config import ConfigError

    if args.steps < 1 or args.per_class < 1 or args.sample_steps < 1 or args.workers < 0:
        raise SystemExit("mmfuse demo: --steps, --per-class and --sample-steps must be >= 1, --workers >= 0")
    try:
        resolve_device(args.device)
        m = run_demo(args.steps, args.out, args.device, args.seed, args.per_class, sample_steps=args.sample_steps,
                     workers=args.workers)
    except ConfigError as exc:
        raise SystemExit(f"mmfuse demo: {exc}") from exc
    print(f"trained {m['steps']} steps in {m['train_seconds']:.0f} s: {m['tokens_per_s']:.0f} text tokens/s, "
          f"{m['images_per_s']:.0f} images/s")
    print(f"caption accuracy on held-out digits:    {m['caption_accuracy']:.1%}")
    print(f"generation accuracy (independent reader): {m['generation_accuracy']:.1%} "
          f"(the reader scores {m['classifier_accuracy_on_real_test_digits']:.1%} on real held-out digits)")
    print(f"editing accuracy (\"<image> make 5\" ...): {m['editing_accuracy']:.1%} of edited held-out digits read "
          "as the asked-for digit")
    out = Path(args.out)
    print(f"wrote {out / 'samples.png'}, {out / 'edits.png'}, {out / 'loss.png'}, {out / 'metrics.json'}")
    print(f"the model folder: {m['model_folder']}; try")
    print(f'  mmfuse generate --checkpoint {m["model_folder"]} --prompt "draw 7" --out 7.png')
    picture = Path(args.out) / "data/img/00000.png"
    print(f'  mmfuse generate --checkpoint {m["model_folder"]} --image {picture} --prompt "caption <image>"')
    print(f'  mmfuse generate --checkpoint {m["model_folder"]} --image {picture} --prompt "<image> make 3" '
          '--out 3.png')
    return 0
