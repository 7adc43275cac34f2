"""MMFusePipeline: the cached pipeline equals the recomputing one for every family; caches are released;
schedulers by name; the model folder round trip; VAEs checked against the model; bad input."""
import json

import pytest
import torch

from mmfuse.engine.generate import generate
from mmfuse.engine.pipeline import MMFusePipeline, image_grid, resolve_scheduler
from mmfuse.models import from_pretrained
from mmfuse.models.fusion import FusionConfig, LlamaFusion
from mmfuse.models.hf_io import CheckpointError
from mmfuse.models.metamorph import MetaMorph, MetaMorphConfig
from mmfuse.models.vae import DiffusersVAE
from tests import offline
from tests.helpers import rel_err
from tests.models.test_decoder import tiny_llama
from tests.models.test_metaquery import make_model
from tests.models.test_siglip import tiny_vision

FUSION = FusionConfig(latent_channels=4, latent_size=8, patch_size=2, boi_token_id=3, eoi_token_id=4)


def trained_looking(model):
    """Zero-initialised output layers get random weights, so predictions depend on the prompt."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def fusion(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(path)
    return trained_looking(LlamaFusion.from_decoder(from_pretrained(path), FUSION))


def metamorph(tmp_path):
    from diffusers import UNet2DConditionModel

    from tests.models.test_metaquery import UNET

    tiny_llama().save_pretrained(tmp_path / "llm")
    tiny_vision().save_pretrained(tmp_path / "vision")
    unet = UNet2DConditionModel(**{**UNET, "cross_attention_dim": 32})
    config = MetaMorphConfig(num_visual_tokens=4, boi_token_id=3, eoi_token_id=4, sd_cross_attention_dim=32)
    return trained_looking(MetaMorph(from_pretrained(tmp_path / "llm"), from_pretrained(tmp_path / "vision"),
                                     config, unet))


def family_model(family, tmp_path, fusion_model):
    if family == "fusion":
        return fusion_model
    if family == "metamorph":
        return metamorph(tmp_path)
    from tests.models.test_decoder import tiny_qwen2
    from tests.models.test_metaquery import QWEN

    tiny_qwen2(**QWEN).save_pretrained(tmp_path / "qwen")
    return trained_looking(make_model("sana", from_pretrained(tmp_path / "qwen")))


PROMPTS = [[7, 8, 9], [5, 5, 6, 11, 12]]


@pytest.mark.parametrize("family", ["fusion", "metamorph", "metaquery"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_pipeline_equals_the_recomputing_one(family, guidance, tmp_path, fusion):
    model = family_model(family, tmp_path, fusion)
    vae = DiffusersVAE(offline.kl_vae())
    pipe = MMFusePipeline(model, vae=vae)
    kwargs = dict(prompt_ids=PROMPTS, num_inference_steps=3, guidance_scale=guidance, seed=0, output_type="pt")
    cached, recomputed = pipe(**kwargs), pipe(**kwargs, recompute=True)
    C, h, w = pipe.family.pipeline.latent_shape(model)
    assert cached.images.shape == (2, 3, 2 * h, 2 * w) and torch.isfinite(cached.images).all()
    assert rel_err(cached.latents, recomputed.latents) <= 1e-5 and rel_err(cached.images, recomputed.images) <= 1e-5
    assert rel_err(cached.latents[0], cached.latents[1]) > 1e-3  # the prompts make different images
    assert all(layer.attn.kv_cache is None for layer in pipe.family.llm(model).layers)  # the model is left as it was


def test_left_padding_does_not_leak_into_an_image(fusion):
    pipe = MMFusePipeline(fusion)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, output_type="latent")
    alone = pipe(prompt_ids=[[9]], latents=noise[:1], **kwargs).images
    beside = pipe(prompt_ids=[[9], [7, 8, 9, 10]], latents=noise, **kwargs).images  # [9] is left-padded here
    assert rel_err(beside[:1], alone) <= 1e-5
    with_zeros = pipe(prompt_ids=[[0, 0, 9]], latents=noise[:1], **kwargs).images
    assert rel_err(with_zeros, alone) > 1e-4  # while real tokens in those places do change it


def test_schedulers_by_name(fusion):
    pipe = MMFusePipeline(fusion)
    for name in ("ddim", "ddpm", "euler", "dpm++", "UniPCMultistepScheduler"):
        out = pipe(prompt_ids=[[7]], num_inference_steps=3, scheduler=name, seed=0, output_type="latent").images
        assert torch.isfinite(out).all(), name
    assert type(resolve_scheduler("euler", pipe.scheduler)).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="does not fit this model's DDIMScheduler"):
        pipe(prompt_ids=[[7]], scheduler="flow_euler", output_type="latent")
    with pytest.raises(ValueError, match="choose from"):
        pipe(prompt_ids=[[7]], scheduler="nonsense", output_type="latent")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(output_type="png"), "output_type"),
        (dict(output_type="pil"), "no VAE"),
        (dict(prompt="a cat"), "exactly one of prompt"),
        (dict(prompt_ids=[[7, 500]]), r"must lie in \[0, 101\)"),
        (dict(prompt_ids=[list(range(5, 100)) * 3]), "exceed the model's context of 256"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents must have shape \(1, 4, 8, 8\)"),
    ],
)
def test_bad_calls_are_refused_before_any_work(fusion, kwargs, message):
    kwargs = {"prompt_ids": [[7, 8]], "output_type": "latent", **kwargs}
    with pytest.raises(ValueError, match=message):
        MMFusePipeline(fusion)(**kwargs)


def test_text_generation_decodes_what_generate_writes(tmp_path):
    base = offline.llama_base(tmp_path / "llm")
    pipe = MMFusePipeline.from_pretrained(base)
    tok = pipe.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok("a red", add_special_tokens=False)["input_ids"]])
    new = generate(pipe.model, ids, 4, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert pipe.generate_text("a red", max_new_tokens=4) == [tok.decode(new, skip_special_tokens=True)]
    with pytest.raises(TypeError, match="does not generate images"):
        pipe("a red square")


def test_model_folder_round_trip_and_vae_checks(tmp_path, fusion):
    tokenizer = offline.tiny_tokenizer()
    pipe = MMFusePipeline(fusion, tokenizer, DiffusersVAE(offline.kl_vae()))
    folder = pipe.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "model_index.json",
                                                        "scheduler", "tokenizer", "vae"]
    back = MMFusePipeline.from_pretrained(folder)
    kwargs = dict(prompt_ids=PROMPTS, num_inference_steps=2, seed=3, output_type="pt")
    assert torch.equal(back(**kwargs).images, pipe(**kwargs).images)
    assert back.tokenizer.get_vocab() == tokenizer.get_vocab()
    pipe.save_pretrained(folder)  # an existing folder is replaced whole, never left half written
    assert not list(tmp_path.glob(".*"))
    # a VAE whose scaling differs from the one the model was trained with is refused
    offline.kl_vae(folder / "vae", scaling_factor=0.25)
    with pytest.raises(CheckpointError, match="scaling_factor 0.5 vs 0.25"):
        MMFusePipeline.from_pretrained(folder)
    offline.kl_vae(folder / "vae", latent_channels=8)
    with pytest.raises(CheckpointError, match="8-channel latents but the model diffuses 4"):
        MMFusePipeline.from_pretrained(folder)


def test_a_broken_model_folder_is_named(tmp_path, fusion):
    folder = MMFusePipeline(fusion).save_pretrained(tmp_path / "model")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MMFusePipeline.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        MMFusePipeline.from_pretrained(tmp_path / "missing")


def test_image_grid():
    grid = image_grid(torch.rand(5, 1, 8, 8), nrow=3)
    assert grid.size == (3 * 9 + 1, 2 * 9 + 1) and grid.mode == "RGB"
    assert json.dumps(grid.getpixel((0, 0))) == "[255, 255, 255]"  # the frame
