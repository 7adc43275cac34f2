"""``mmfuse demo``: a tiny Transfusion model learns captions <-> handwritten digits from scratch.

Data: scikit-learn's digits (1,797 8x8 images that ship inside the package, no download). Each image
is its own 1 x 8 x 8 "latent", cut into 16 patches of 2 x 2. Two kinds of documents are packed into
rows and trained together with LM cross-entropy + 5 x DDPM noise-prediction MSE:

* understanding  ``<caption> BOI [clean image] EOI <digit>``  (the image conditions the text)
* generation     ``<draw> <digit> BOI [noised image] EOI``    (the digit is dropped 10% of the time,
  which trains the unconditional branch of classifier-free guidance)

Afterwards, on held-out digits: caption accuracy (the digit token the model writes after a real
image), and generation accuracy (the share of generated digits that an independent classifier
trained on the real digits reads as the requested class). Writes ``samples.png``, ``loss.png`` and
``metrics.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mmfuse.engine.packing import Image, pack
from mmfuse.engine.sampling import sample_images, save_png
from mmfuse.engine.train import TrainConfig, Trainer
from mmfuse.models.decoder import Decoder, DecoderConfig
from mmfuse.models.fusion import FusionConfig, LlamaFusion

PAD, BOI, EOI, CAPTION, DRAW = 0, 1, 2, 3, 4
DIGIT0 = 5  # tokens 5..14 are the digits 0..9
VOCAB = 16
ROW_LEN = 80  # four 20-position documents per row


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


def build_model(device: torch.device) -> LlamaFusion:
    decoder_config = DecoderConfig(vocab_size=VOCAB, dim=128, hidden_dim=384, num_layers=4, num_heads=4,
                                   num_kv_heads=2, head_dim=32, tie_embeddings=True)
    fusion_config = FusionConfig(latent_channels=1, latent_size=8, patch_size=2, boi_token_id=BOI,
                                 eoi_token_id=EOI, train_text=True, beta_schedule="squaredcos_cap_v2",
                                 timestep_dim=128)
    with torch.device(device):
        decoder = Decoder(decoder_config)
        torch.nn.init.normal_(decoder.embed.weight, std=0.02)
    return LlamaFusion.from_decoder(decoder, fusion_config)


def documents(images, labels, gen: torch.Generator, n: int, drop_label: float = 0.1) -> list:
    """``n`` random documents: half understanding, half generation."""
    docs = []
    picks = torch.randint(0, len(labels), (n,), generator=gen)
    drops = torch.rand(n, generator=gen) < drop_label
    for i, (k, drop) in enumerate(zip(picks.tolist(), drops.tolist())):
        digit = DIGIT0 + int(labels[k])
        if i % 2 == 0:
            docs.append([[CAPTION], Image(images[k], diffuse=False), [digit]])
        else:
            docs.append([[DRAW] + ([] if drop else [digit]), Image(images[k], diffuse=True)])
    return docs


def train(model, images, labels, steps: int, batch_docs: int, device, out: Path, seed: int):
    def get_batch(step, micro):
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        return pack(documents(images, labels, gen, batch_docs), ROW_LEN, 16, BOI, EOI, PAD).to(device)

    def loss_fn(batch, generator):
        return model.training_loss(batch.input_ids, batch.modality, batch.labels, batch.images, batch.kv_start,
                                   batch.kv_end, position_ids=batch.position_ids,
                                   image_mask=batch.image_loss_mask, generator=generator)

    config = TrainConfig(steps=steps, lr=2e-3, warmup_steps=min(100, steps // 10 + 1), min_lr_ratio=0.05,
                         weight_decay=0.01, grad_clip=1.0, seed=seed, log_every=10, out_dir=str(out / "run"))
    counts = lambda b: {"tokens": b.num_text_tokens, "images": int(b.images.shape[0])}  # noqa: E731
    trainer = Trainer(model, loss_fn, get_batch, config, count=counts)
    return trainer.train(progress=None)


@torch.no_grad()
def caption_accuracy(model, images, labels, device) -> float:
    model.eval()
    n = len(labels)
    ids = torch.tensor([CAPTION, BOI] + [0] * 16 + [EOI], device=device).repeat(n, 1)
    modality = torch.zeros_like(ids)
    modality[:, 2:18] = 1
    kv_start = torch.zeros(n, ids.shape[1], dtype=torch.int32, device=device)
    kv_end = (torch.arange(ids.shape[1], device=device) + 1).to(torch.int32).repeat(n, 1)
    kv_end[:, 2:18] = 18  # the image span is bidirectional
    hidden, _ = model(ids, modality, images.to(device), torch.zeros(n, dtype=torch.long, device=device), kv_start, kv_end)
    digit_logits = model.decoder.logits(hidden[:, -1])[:, DIGIT0:DIGIT0 + 10]
    return float((digit_logits.argmax(-1).cpu() == labels).float().mean())


def generate_digits(model, per_class: int, device, seed: int, steps: int = 50, guidance: float = 3.0):
    """(10 * per_class, 1, 8, 8) generated images in [-1, 1], class-major, and their requested labels."""
    model.eval()
    wanted = torch.arange(10).repeat_interleave(per_class)
    prompts = torch.stack([torch.tensor([DRAW, DIGIT0 + int(d), BOI]) for d in wanted]).to(device)
    uncond = torch.tensor([[DRAW, BOI]], device=device).expand(len(wanted), 2)
    latents = sample_images(model, prompts, num_steps=steps, guidance_scale=guidance, uncond_ids=uncond,
                            generator=torch.Generator(device=device).manual_seed(seed), progress=None)
    return latents.clamp(-1, 1).cpu(), wanted


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
             per_class: int = 10, batch_docs: int = 32, sample_steps: int = 50) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    model = build_model(device)
    t0 = time.perf_counter()
    history = train(model, train_x, train_y, steps, batch_docs, device, out, seed)
    train_s = time.perf_counter() - t0
    caption_acc = caption_accuracy(model, test_x, test_y, device)
    t1 = time.perf_counter()
    generated, wanted = generate_digits(model, per_class, device, seed, steps=sample_steps)
    sample_s = time.perf_counter() - t1
    clf = digit_classifier(train_x, train_y)
    real_acc = float(clf.score(test_x.reshape(len(test_y), -1).numpy(), test_y.numpy()))
    gen_acc = float((torch.tensor(clf.predict(generated.reshape(len(wanted), -1).numpy())) == wanted).float().mean())
    # 8x8 digits enlarged 4x (nearest) so the grid is readable: one row per class.
    big = generated.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    save_png((big + 1) / 2, out / "samples.png", nrow=per_class)
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
        "classifier_accuracy_on_real_test_digits": real_acc,
        "sampling_seconds": sample_s,
        "images_generated": len(wanted),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--out", default="mmfuse-demo", help="output folder (default ./mmfuse-demo)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=10, help="generated digits per class (default 10)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per image (default 50)")


def main(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.per_class < 1 or args.sample_steps < 1:
        raise SystemExit("mmfuse demo: --steps, --per-class and --sample-steps must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"mmfuse demo: --device {args.device} but no CUDA device is available")
    m = run_demo(args.steps, args.out, args.device, args.seed, args.per_class, sample_steps=args.sample_steps)
    print(f"trained {m['steps']} steps in {m['train_seconds']:.0f} s: {m['tokens_per_s']:.0f} text tokens/s, "
          f"{m['images_per_s']:.0f} images/s")
    print(f"caption accuracy on held-out digits:    {m['caption_accuracy']:.1%}")
    print(f"generation accuracy (independent reader): {m['generation_accuracy']:.1%} "
          f"(the reader scores {m['classifier_accuracy_on_real_test_digits']:.1%} on real held-out digits)")
    print(f"wrote {Path(args.out) / 'samples.png'}, {Path(args.out) / 'loss.png'}, {Path(args.out) / 'metrics.json'}")
    return 0
