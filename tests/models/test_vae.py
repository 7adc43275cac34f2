"""Image codecs against diffusers' own encode / decode (tiny AutoencoderKL / AutoencoderDC built here)."""
import json

import pytest
import torch

from mmfuse.models.hf_io import CheckpointError
from mmfuse.models.vae import DiffusersVAE, PixelSpace, check_codec, load_codec
from tests import offline
from tests.helpers import rel_err


def test_kl_latents_are_diffusers_posterior_samples_scaled_and_shifted():
    vae = offline.kl_vae(scaling_factor=0.5)
    vae.register_to_config(shift_factor=0.1)  # as SD3 / Flux VAEs have
    codec = DiffusersVAE(vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) - 0.1) * 0.5
        got = codec.encode(x, torch.Generator().manual_seed(0))
        # (mean + std * eps - shift) * scale, summed in another order: equal to fp32 rounding
        assert got.shape == (2, 4, 8, 8) and rel_err(got, want) <= 1e-6
        assert torch.equal(codec.decode(got), vae.decode(got / 0.5 + 0.1).sample)
    assert codec.describe() == {"class": "AutoencoderKL", "latent_channels": 4, "downsample": 2, "scaling_factor": 0.5,
                                "shift_factor": 0.1}


def test_dc_latents_are_deterministic_and_scaled():
    vae = offline.dc_vae()
    codec = DiffusersVAE(vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, std = codec.moments(x)
        assert std is None and torch.equal(mean, vae.encode(x).latent * 0.41)
        assert torch.equal(codec.encode(x), mean)
        assert torch.equal(codec.decode(mean), vae.decode(mean / 0.41).sample)
    assert codec.downsample == 2 and codec.latent_channels == 4


def test_pixel_space_is_the_identity(tmp_path):
    codec = load_codec("pixels", pixel_channels=1)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(codec.encode(x), x) and torch.equal(codec.decode(x), x) and codec.downsample == 1
    codec.save_pretrained(tmp_path / "vae")
    assert load_codec(tmp_path / "vae") == PixelSpace(1)
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        PixelSpace(4)


def test_folders_that_are_not_a_safetensors_vae_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no VAE folder"):
        load_codec(tmp_path / "nothing")
    offline.sd15_unet(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="holds a 'UNet2DConditionModel'"):
        load_codec(tmp_path / "unet")
    offline.kl_vae(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors weights load"):
        load_codec(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_codec(tmp_path / "vae")


def test_a_vae_is_checked_against_the_model_and_its_training_codec():
    codec = DiffusersVAE(offline.kl_vae(scaling_factor=0.5))
    check_codec(codec, 4, json.loads(json.dumps(codec.describe())))
    with pytest.raises(CheckpointError, match="4-channel latents but the model diffuses 16"):
        check_codec(codec, 16)
    with pytest.raises(CheckpointError, match="scaling_factor 0.18215 vs 0.5"):
        check_codec(codec, 4, {**codec.describe(), "scaling_factor": 0.18215})

