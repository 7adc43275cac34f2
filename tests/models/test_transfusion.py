"""Transfusion with one shared set of weights (the paper's own model), with DDPM and flow-matching
objectives and samplers: everything trains, the loss falls, the flow pair is diffusers', the cached
sampler equals the recomputing one, and ``mmfuse train`` -> ``mmfuse generate`` writes a PNG."""
import dataclasses

import pytest
import torch

from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models.fusion import FusionConfig, LlamaFusion, load_fusion, save_fusion
from tests.helpers import rel_err
from tests.models.test_fusion import FUSION, base, interleaved_batch  # noqa: F401 (the fixture)

SHARED = dataclasses.replace(FUSION, shared_weights=True)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_one_shared_expert_and_everything_trains(base, objective):  # noqa: F811
    model = LlamaFusion.from_decoder(base, dataclasses.replace(SHARED, objective=objective))
    assert model.decoder.config.num_experts == 1 and all(p.requires_grad for p in model.parameters())
    # the text path is the base decoder's, unchanged
    assert torch.equal(model.decoder.layers[0].attn.qkv.weights[0], base.layers[0].attn.qkv.weights[0])
    batch = interleaved_batch(SHARED, 101, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):  # a fixed batch and noise: the loss must fall
        objective_ = model.training_loss(batch, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        objective_.total.backward()
        if step == 0:
            assert all(p.grad is not None for n, p in model.named_parameters() if "unet" not in n), \
                [n for n, p in model.named_parameters() if p.grad is None]
            assert model.decoder.embed.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(objective_.total))
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_flow_pair_is_diffusers(base):  # noqa: F811
    """x_t = (1 - s) x0 + s eps as FlowMatchEulerDiscreteScheduler.scale_noise; the target eps - x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = LlamaFusion.from_decoder(base, dataclasses.replace(SHARED, objective="flow"))
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[[1, 4, 8]]  # the scheduler's own timesteps (its sigmas are t / 1000)
    x_t, target, timesteps = model._noised(x0, eps, t, None, draw=False)
    want = torch.stack([scheduler.scale_noise(x0[i:i + 1], t[i:i + 1], eps[i:i + 1])[0] for i in range(3)])
    assert rel_err(x_t, want) <= 1e-6 and torch.equal(target, eps - x0) and rel_err(timesteps, t) <= 1e-6
    drawn = model._noised(x0, eps, None, torch.Generator().manual_seed(2), draw=True)[2]
    assert ((drawn > 0) & (drawn < 1000)).all()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_sampler_equals_the_recomputing_one(base, objective, guidance, tmp_path):  # noqa: F811
    model = LlamaFusion.from_decoder(base, dataclasses.replace(SHARED, objective=objective))
    with torch.no_grad():
        torch.nn.init.normal_(model.patch_out.weight, std=0.5)  # not the zero init: predictions must matter
    save_fusion(model, tmp_path)
    model = load_fusion(tmp_path).eval()
    assert model.config.shared_weights and model.config.objective == objective
    pipe = MMFusePipeline(model)
    scheduler = type(pipe.scheduler).__name__
    assert scheduler == ("FlowMatchEulerDiscreteScheduler" if objective == "flow" else "DDIMScheduler")
    kwargs = dict(prompt_ids=[[7, 8, 9], [5, 6]], num_inference_steps=3, guidance_scale=guidance, seed=0,
                  output_type="latent")
    cached, recomputed = pipe(**kwargs), pipe(**kwargs, recompute=True)
    assert rel_err(cached.latents, recomputed.latents) <= 1e-5
    assert rel_err(cached.latents[0], cached.latents[1]) > 1e-3


def test_shared_weights_and_flow_through_the_command_line(tmp_path):
    import json

    from PIL import Image

    from mmfuse.cli import main
    from tests.engine.test_user_path import fusion_run

    config = fusion_run(tmp_path)
    cfg = json.loads(config.read_text())
    cfg["fusion"].update(shared_weights=True, objective="flow", sigma_density="logit_normal")
    config.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "x.png"
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--prompt", "a red square",
                 "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (8, 8)
    saved = json.loads((tmp_path / "run" / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_bad_objective_is_named():
    with pytest.raises(ValueError, match="objective"):
        FusionConfig(objective="edm")
    with pytest.raises(ValueError, match="sigma_density"):
        FusionConfig(sigma_density="cosine")


def test_schedule_options_reach_training_and_sampling(base):  # noqa: F811
    """Zero-terminal-SNR betas, x0 prediction and the dynamic (mu) flow shift: the model trains with the
    schedule its sampling scheduler uses (each equal to diffusers in tests/kernels/test_schedules.py)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from mmfuse.kernels.schedules import flow_mu, sample_sigmas

    zero_snr = LlamaFusion.from_decoder(base, dataclasses.replace(FUSION, rescale_betas_zero_snr=True,
                                                                  prediction_type="v_prediction"))
    sched = MMFusePipeline(zero_snr).scheduler
    assert isinstance(sched, DDIMScheduler) and sched.config.rescale_betas_zero_snr
    assert torch.allclose(zero_snr.alphas_cumprod, sched.alphas_cumprod) and float(zero_snr.alphas_cumprod[-1]) == 0
    x0 = LlamaFusion.from_decoder(base, dataclasses.replace(FUSION, prediction_type="sample"))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(x0._noised(latents, noise, torch.tensor([3, 900]), None, draw=False)[1], latents)
    with pytest.raises(ValueError, match="prediction_type"):
        FusionConfig(prediction_type="x0")
    dynamic = LlamaFusion.from_decoder(base, dataclasses.replace(SHARED, objective="flow", flow_dynamic_shift=True))
    with torch.no_grad():
        torch.nn.init.normal_(dynamic.patch_out.weight, std=0.5)
    mu = flow_mu(FUSION.patches_per_image)
    drawn = dynamic._noised(latents, noise, None, torch.Generator().manual_seed(4), draw=True)[2]
    assert torch.equal(drawn, sample_sigmas(2, "uniform", mu=mu, generator=torch.Generator().manual_seed(4)) * 1000)
    pipe = MMFusePipeline(dynamic.eval())
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    kwargs = dict(prompt_ids=[[7, 8, 9]], num_inference_steps=3, guidance_scale=2.0, seed=0, output_type="latent")
    assert rel_err(pipe(**kwargs).latents, pipe(**kwargs, recompute=True).latents) <= 1e-5


def test_metaquery_schedule_options(tmp_path):
    from diffusers import DDIMScheduler

    from mmfuse.models import from_pretrained
    from tests.models.test_decoder import tiny_qwen2
    from tests.models.test_metaquery import QWEN, make_model

    tiny_qwen2(**QWEN).save_pretrained(tmp_path)
    llm = from_pretrained(tmp_path)
    sana = make_model("sana", llm, flow_dynamic_shift=True)
    assert sana.dynamic_mu is not None and sana.make_scheduler().config.use_dynamic_shifting
    out = MMFusePipeline(sana.eval())(prompt_ids=[[5, 6]], num_inference_steps=2, output_type="latent", seed=0)
    assert torch.isfinite(out.latents).all()
    sd15 = make_model("sd15", llm, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched = sd15.make_scheduler()
    assert isinstance(sched, DDIMScheduler) and torch.allclose(sd15.alphas_cumprod, sched.alphas_cumprod)
