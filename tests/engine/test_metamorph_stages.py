"""MetaMorph's two stages through ``mmfuse train``: the LLM stage, then the visualizer stage started
from its model folder (``init``) -- SigLIP tokens -> the projection -> the SD1.5 UNet, DDPM, condition
dropout -- which trains the projection alone, and a generation with guidance through it to a PNG."""
import json

import torch
from safetensors.torch import load_file

from mmfuse.cli import main
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models.metamorph import VisualizerBatch, VisualizerImages, split_pair
from tests import offline
from tests.engine.test_user_path import DATA, metamorph_run


def two_stages(tmp_path, **visualizer):
    assert main(["train", "--config", str(metamorph_run(tmp_path))]) == 0
    stage2 = {"family": "metamorph", "init": "run/model", "metamorph": {"stage": "visualizer", **visualizer},
              "data": DATA, "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 1, "out_dir": "visualizer"}}
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))
    assert main(["train", "--config", str(tmp_path / "stage2.json")]) == 0
    return tmp_path / "run" / "model", tmp_path / "visualizer" / "model"


def test_the_visualizer_stage_trains_the_projection_alone_and_draws_with_guidance(tmp_path):
    first, second = two_stages(tmp_path)
    before, after = (load_file(str(f / "model.safetensors")) for f in (first, second))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"sd_proj.weight", "sd_proj.bias"}  # the LLM, adapter, heads, tower and UNet stay
    config = json.loads((second / "config.json").read_text())["metamorph"]
    assert config["stage"] == "visualizer" and config["condition_dropout"] == 0.1
    log = [json.loads(line) for line in (tmp_path / "visualizer" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["images"] > 0 and "diffusion" in r for r in log)
    out = tmp_path / "x.png"
    assert main(["generate", "--checkpoint", str(second), "--prompt", "a red square", "--out", str(out),
                 "--steps", "2", "--guidance", "3"]) == 0
    from PIL import Image

    assert Image.open(out).size == (16, 16)
    # the stage-2 folder still reads pictures in its prompts (as SigLIP pixels, not training pairs)
    png = tmp_path / "img" / "0.png"
    assert main(["generate", "--checkpoint", str(second), "--image", str(png), "--prompt", "what is this",
                 "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--checkpoint", str(second), "--image", str(png), "--prompt", "make it blue",
                 "--out", str(tmp_path / "edit.png"), "--steps", "2"]) == 0


def test_the_visualizer_loss_falls_and_guidance_is_unconditional_on_zero_tokens(tmp_path):
    _, second = two_stages(tmp_path, train_unet=True)
    pipe = MMFusePipeline.from_pretrained(second)
    model = pipe.model.train()
    images = VisualizerImages(model, pipe.vae, pipe.image_processor)
    pictures = torch.stack([images.preprocess(offline.picture(c, "square")) for c in ("red", "blue", "green")])
    latents, tokens = split_pair(model, images.encode(pictures))
    assert latents.shape[0] == 3 and torch.allclose(tokens.norm(dim=-1), torch.ones(3, tokens.shape[1]), atol=1e-5)
    batch = VisualizerBatch(latents, tokens, torch.tensor([True, True, False]))
    assert model.diffusion.conv_in.weight.requires_grad and not model.decoder.embed.weight.requires_grad
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):  # the same batch and noise every step: the loss must fall
        loss = model.visualizer_loss(batch, torch.Generator().manual_seed(0)).total
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert model.sd_proj.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    # guidance: the unconditional row (BOI alone) conditions the UNet with zero tokens, as dropout trains it
    seen = []
    real = model.sd_condition
    model.sd_condition = lambda t: (seen.append(t.clone()), real(t))[1]
    pipe.model.eval()
    pipe(prompt_ids=[[5, 6]], num_inference_steps=1, guidance_scale=2.0, output_type="latent")
    (rows,) = seen
    assert rows.shape[0] == 2 and rows[0].abs().sum() > 0 and torch.equal(rows[1], torch.zeros_like(rows[1]))
