"""The user's path, for every family: PNG pictures + captions and a tiny offline base checkpoint (with
its tokenizer; tiny diffusers VAE / UNet / SANA) -> ``mmfuse train`` -> ``mmfuse generate --prompt ...
--out x.png`` -> an RGB PNG of the model's resolution."""
import json

import pytest
import torch
from PIL import Image

from mmfuse.cli import main
from mmfuse.engine.pipeline import MMFusePipeline
from tests import offline
from tests.models.test_metaquery import COND

DATA = {"path": "captions.jsonl", "row_len": 32, "rows_per_batch": 2, "num_workers": 0}


def fusion_run(folder, **data):
    offline.llama_base(folder / "llm")
    offline.kl_vae(folder / "vae")
    offline.captioned_pictures(folder)
    return offline.write_config(folder, family="fusion", base="llm", vae="vae",
                                fusion={"latent_channels": 4, "latent_size": 4, "patch_size": 2, "timestep_dim": 32},
                                data={**DATA, **data})


def metamorph_run(folder):
    offline.llama_base(folder / "llm")
    offline.siglip(folder / "vision")
    offline.sd15_unet(folder / "unet", cross_attention_dim=32)
    offline.kl_vae(folder / "vae")
    offline.captioned_pictures(folder)
    return offline.write_config(folder, family="metamorph", base="llm", vision="vision", diffusion="unet", vae="vae",
                                metamorph={"num_visual_tokens": 4, "sd_cross_attention_dim": 32}, data=DATA)


def metaquery_run(folder):
    offline.qwen_base(folder / "llm")
    offline.sana(folder / "sana")
    offline.dc_vae(folder / "vae")
    offline.captioned_pictures(folder)
    return offline.write_config(folder, family="metaquery", base="llm", diffusion="sana", vae="vae",
                                metaquery={"num_queries": 3, "connector_layers": 1, "connector_dim": 32,
                                           "connector_heads": 2, "connector_hidden_dim": 48, "cond_dim": COND},
                                data={**DATA, "row_len": 16, "rows_per_batch": 3})


RUNS = {"fusion": (fusion_run, 8), "metamorph": (metamorph_run, 16), "metaquery": (metaquery_run, 16)}


@pytest.mark.parametrize("family", RUNS)
def test_pictures_and_captions_in_png_out(tmp_path, family, capsys):
    make, size = RUNS[family]
    config = make(tmp_path)
    assert main(["train", "--config", str(config)]) == 0
    model = tmp_path / "run" / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["family"] == family and index["tokenizer"] == "tokenizer" and index["vae"]["latent_channels"] == 4
    out = tmp_path / "x.png"
    assert main(["generate", "--checkpoint", str(model), "--prompt", "a red square", "--out", str(out),
                 "--steps", "2", "--guidance", "2", "--seed", "1"]) == 0
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == (size, size)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left half done
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(model), "--prompt", "a red", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()  # the families' LLMs write text too (a random one may well stop at once)
    assert main(["generate", "--checkpoint", str(model), "--prompt-ids", "5,6", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.strip().split(",")
    assert printed[:2] == ["5", "6"] and 2 <= len(printed) <= 5


def test_several_images_and_a_scheduler_by_name(tmp_path, capsys):
    assert main(["train", "--config", str(fusion_run(tmp_path))]) == 0
    out = tmp_path / "pics" / "x.png"
    out.parent.mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--prompt", "a blue circle", "--out",
                 str(out), "--num-images", "2", "--steps", "2", "--scheduler", "euler"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["x_0.png", "x_1.png"]
    a, b = (Image.open(out.parent / f"x_{i}.png") for i in range(2))
    assert a.tobytes() != b.tobytes()  # two draws, not one image twice


def test_the_model_folder_holds_everything_generation_needs(tmp_path):
    assert main(["train", "--config", str(fusion_run(tmp_path))]) == 0
    moved = tmp_path / "elsewhere"
    (tmp_path / "run" / "model").rename(moved)
    for part in ("llm", "vae"):  # the base checkpoints are gone: the folder alone must do
        import shutil

        shutil.rmtree(tmp_path / part)
    pipe = MMFusePipeline.from_pretrained(moved)
    assert pipe.tokenizer.convert_tokens_to_ids("<boi>") == pipe.model.config.boi_token_id
    assert pipe("a red square", num_inference_steps=2, seed=0).images[0].size == (8, 8)


def test_workers_read_the_same_batches_as_the_main_process(tmp_path):
    from mmfuse.engine.config import load_run_config
    from mmfuse.engine.run import batch_stream, set_up

    run = set_up(load_run_config(fusion_run(tmp_path, num_workers=2)), torch.device("cpu"))
    with_workers = batch_stream(run)
    run.config.data.num_workers = 0
    in_process = batch_stream(run)
    for step in range(2):  # the run's two steps
        a, b = with_workers(step, 0), in_process(step, 0)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.images, b.images)
    with_workers.close()


def test_a_run_with_an_ema_writes_the_averaged_weights_into_its_model_folder(tmp_path):
    from safetensors.torch import load_file

    config = fusion_run(tmp_path)
    cfg = json.loads(config.read_text())
    cfg["train"].update(ema_decay=0.5, steps=3)
    config.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(config)]) == 0
    ema = load_file(str(tmp_path / "run" / "step_0000003" / "ema.safetensors"))
    raw = load_file(str(tmp_path / "run" / "step_0000003" / "model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    name = "decoder.layers.0.attn.qkv.weights.1"  # a trained weight: its average, not its last value
    assert torch.equal(saved[name], ema[name]) and not torch.equal(saved[name], raw[name])
    frozen = "decoder.layers.0.attn.qkv.weights.0"
    assert torch.equal(saved[frozen], raw[frozen])
