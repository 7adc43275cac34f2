"""Noise schedules and noise-level sampling vs diffusers' own schedulers (built offline)."""
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from mmfuse.kernels.schedules import (
    ddpm_alphas_cumprod,
    ddpm_betas,
    dynamic_shift_sigmas,
    flow_mu,
    sample_sigmas,
    sample_timesteps,
    shift_sigmas,
)


def assert_float_equal(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want.to(torch.float32), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule,beta_start,beta_end", [
    ("linear", 0.0001, 0.02),           # DDPM
    ("scaled_linear", 0.00085, 0.012),  # Stable Diffusion 1.5
    ("squaredcos_cap_v2", 0.0001, 0.02),  # GLIDE / improved DDPM
])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_ddpm_schedule_equals_diffusers(schedule, beta_start, beta_end, num_train_timesteps):
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=schedule,
                          beta_start=beta_start, beta_end=beta_end)
    betas = ddpm_betas(num_train_timesteps, schedule, beta_start, beta_end)
    assert_float_equal(betas, sched.betas)
    assert_float_equal(ddpm_alphas_cumprod(betas), sched.alphas_cumprod)


@pytest.mark.parametrize("schedule,beta_start,beta_end", [
    ("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)])
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_zero_terminal_snr_equals_diffusers(schedule, beta_start, beta_end, num_train_timesteps):
    from diffusers import DDIMScheduler

    kwargs = dict(num_train_timesteps=num_train_timesteps, beta_schedule=schedule, beta_start=beta_start,
                  beta_end=beta_end, rescale_betas_zero_snr=True)
    betas = ddpm_betas(num_train_timesteps, schedule, beta_start, beta_end, rescale_zero_snr=True)
    for sched in (DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)):
        assert_float_equal(betas, sched.betas)
        assert_float_equal(ddpm_alphas_cumprod(betas), sched.alphas_cumprod)
    assert float(ddpm_alphas_cumprod(betas)[-1]) == 0.0  # the last step is pure noise


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 9000])
@pytest.mark.parametrize("steps", [1, 7, 28])
def test_dynamic_shift_equals_the_flow_match_scheduler(image_seq_len, steps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = flow_mu(image_seq_len)
    assert mu == pytest.approx(calculate_shift(image_seq_len), abs=1e-12)
    assert flow_mu(image_seq_len, 64, 1024, 0.3, 1.2) == pytest.approx(calculate_shift(image_seq_len, 64, 1024, 0.3, 1.2))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    sched.set_timesteps(steps, mu=mu)
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    plain.set_timesteps(steps)
    assert_float_equal(dynamic_shift_sigmas(plain.sigmas[:-1], mu), sched.sigmas[:-1])
    drawn = sample_sigmas(513, "logit_normal", mu=mu, generator=torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling("logit_normal", 513, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    assert_float_equal(drawn, torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / u - 1)))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("num_train_timesteps", [1000, 50])
def test_shift_equals_flow_match_scheduler(shift, num_train_timesteps):
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift).sigmas
    assert_float_equal(shift_sigmas(plain, shift), shifted)


@pytest.mark.parametrize("density,kwargs", [
    ("uniform", {}),
    ("logit_normal", dict(logit_mean=0.0, logit_std=1.0)),
    ("logit_normal", dict(logit_mean=-0.5, logit_std=1.5)),
])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_draws_equal_diffusers_density(density, kwargs, shift):
    u = compute_density_for_timestep_sampling(density, 257, generator=torch.Generator().manual_seed(7), **kwargs)
    sigmas = sample_sigmas(257, density, shift=shift, generator=torch.Generator().manual_seed(7), **kwargs)
    want = shift * u / (1 + (shift - 1) * u)  # SD3's shift, written out
    assert_float_equal(sigmas, want)
    assert bool(((sigmas >= 0) & (sigmas <= 1)).all())


def test_logit_normal_concentrates_mid_range():
    sigmas = sample_sigmas(20000, "logit_normal", generator=torch.Generator().manual_seed(0))
    # sigmoid(N(0, 1)): the middle third is |z| < log 2, ~51% of the mass (uniform would give 33%).
    middle = ((sigmas > 1 / 3) & (sigmas < 2 / 3)).float().mean().item()
    assert 0.49 < middle < 0.535


def test_timesteps_are_uniform_and_in_range():
    t = sample_timesteps(50000, 10, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (50000,)
    counts = torch.bincount(t, minlength=10)
    assert counts.numel() == 10 and int(t.min()) == 0 and int(t.max()) == 9
    assert (counts - 5000).abs().max().item() < 300  # ~4 standard deviations


def test_same_generator_same_draws():
    a = sample_timesteps(16, 1000, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(16, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("call,words", [
    (lambda: ddpm_betas(1000, "cosine"), "beta_schedule"),
    (lambda: ddpm_betas(0), "num_train_timesteps"),
    (lambda: ddpm_alphas_cumprod(torch.rand(3, 3)), "betas"),
    (lambda: sample_timesteps(4, 0), "num_train_timesteps"),
    (lambda: sample_timesteps(-1), "batch"),
    (lambda: sample_sigmas(4, "mode"), "density"),
    (lambda: sample_sigmas(4, "logit_normal", logit_std=0.0), "logit_std"),
    (lambda: shift_sigmas(torch.rand(4), 0.0), "shift"),
])
def test_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()
