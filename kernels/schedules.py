"""Noise schedules and training-time sampling of noise levels (pure PyTorch, tiny tensors).

* DDPM: :func:`ddpm_betas` / :func:`ddpm_alphas_cumprod` give the same fp32 values as diffusers'
  ``DDPMScheduler(beta_schedule=...)`` for "linear", "scaled_linear" (Stable Diffusion) and
  "squaredcos_cap_v2" (GLIDE cosine); :func:`sample_timesteps` draws t uniformly.
  ``rescale_zero_snr`` rescales them to zero terminal SNR (Lin et al. 2023; diffusers'
  ``rescale_betas_zero_snr``).
* Flow matching (SD3 / SANA): :func:`sample_sigmas` draws sigma in (0, 1) from a uniform or a
  logit-normal density (as diffusers' ``compute_density_for_timestep_sampling``) and applies the
  resolution shift of :func:`shift_sigmas`, the transform ``FlowMatchEulerDiscreteScheduler(shift=...)``
  applies to its sigmas -- or, with ``mu``, the resolution-dependent one of
  :func:`dynamic_shift_sigmas` (``use_dynamic_shifting``; ``mu`` from :func:`flow_mu` of the image's
  token count, as diffusers' ``calculate_shift``). The model's timestep conditioning is
  ``sigma * num_train_timesteps``.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SIGMA_DENSITIES = ("uniform", "logit_normal")
_MAX_COSINE_BETA = 0.999  # GLIDE's cap: keeps the last steps from destroying all signal at once


def _check_num_timesteps(num_train_timesteps: int) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")


def _cosine_betas(num_train_timesteps: int) -> torch.Tensor:
    """GLIDE's squared-cosine alpha_bar, discretised; computed in float64 Python like diffusers."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), _MAX_COSINE_BETA) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def ddpm_betas(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    rescale_zero_snr: bool = False,
) -> torch.Tensor:
    """(num_train_timesteps,) fp32 betas; ``beta_start``/``beta_end`` are unused by the cosine schedule.
    ``rescale_zero_snr``: rescaled so that the last timestep is pure noise (zero terminal SNR)."""
    _check_num_timesteps(num_train_timesteps)
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's latent schedule
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    return _zero_terminal_snr(betas) if rescale_zero_snr else betas


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so its first value stays and its last becomes 0 (Lin et al., Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def ddpm_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` (what ``ddpm_training_pair`` takes, indexed by t)."""
    if not isinstance(betas, torch.Tensor) or betas.dim() != 1:
        raise ValueError(f"betas must be a 1-D tensor, got {getattr(betas, 'shape', type(betas).__name__)}")
    return torch.cumprod(1.0 - betas, dim=0)


def sample_timesteps(
    batch: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) int64 timesteps uniform in [0, num_train_timesteps), as diffusers' training scripts draw them."""
    _check_num_timesteps(num_train_timesteps)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift ``shift * s / (1 + (shift - 1) * s)``: shift > 1 spends more steps at high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The dynamic shift's ``mu`` for an image of ``image_seq_len`` tokens: linear from ``base_shift``
    at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def dynamic_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The resolution-dependent shift ``e^mu / (e^mu + 1 / s - 1)`` (``FlowMatchEulerDiscreteScheduler``
    with ``use_dynamic_shifting``, exponential time shift)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_sigmas(
    batch: int,
    density: str = "uniform",
    *,
    shift: float = 1.0,
    mu: float | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) fp32 flow-matching noise levels in [0, 1].

    Args:
        density: "uniform" (``torch.rand``) or "logit_normal" (``sigmoid(N(logit_mean, logit_std))``,
            SD3's default); the same draws as diffusers' ``compute_density_for_timestep_sampling``
            with the same generator.
        shift: resolution shift applied after drawing (1.0 = none; SD3 uses 3.0).
        mu: instead of ``shift``, the dynamic shift of :func:`dynamic_shift_sigmas`.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if density == "uniform":
        u = torch.rand((batch,), generator=generator, device=device)
    elif density == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch,), generator=generator, device=device))
    else:
        raise ValueError(f"density must be one of {SIGMA_DENSITIES}, got {density!r}")
    if mu is not None:
        return dynamic_shift_sigmas(u, mu)
    return u if shift == 1.0 else shift_sigmas(u, shift)
