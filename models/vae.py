"""Image codecs: how pictures become the latents a family diffuses, and latents become pictures again.

* :class:`DiffusersVAE` wraps a diffusers ``AutoencoderKL`` (Stable Diffusion 1.5 style) or
  ``AutoencoderDC`` (SANA's deep-compression autoencoder) loaded from a folder of safetensors. Latents
  are ``(z - shift_factor) * scaling_factor`` with both factors read from the VAE's config, as diffusers'
  pipelines and training scripts do.
* :class:`PixelSpace` is the identity codec: the image itself (grayscale or RGB, in [-1, 1]) is the
  "latent" (pixel-space diffusion, e.g. the 8 x 8 digits of ``mmfuse demo``).

A codec's ``describe()`` is recorded in every model folder mmfuse writes, so that a model is never
paired with a VAE whose channels or scaling differ from the one it was trained with.

:class:`LatentImages` is the image input of the latent families (LlamaFusion / Transfusion, MetaQuery):
PIL images are resized and centre-cropped to the model's resolution on the CPU (a data-loader worker
runs that part), then encoded on the training device in batches.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .hf_io import CheckpointError

PIXEL_SPACE = "pixels"  # the value of a config's "vae" key that selects the identity codec
_DIFFUSERS_VAES = ("AutoencoderKL", "AutoencoderDC")


class ImageCodec:
    """Pictures (N, image_channels, H, W) in [-1, 1] <-> latents (N, latent_channels, H / d, W / d)."""

    latent_channels: int
    image_channels: int
    downsample: int  # d: image pixels per latent position along each side

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's posterior: mean and std (None for a deterministic encoder), both scaled."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, latent_channels, h, w) -> pictures (N, image_channels, h * d, w * d) in about [-1, 1]."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a model trained on this codec's latents depends on (checked when they meet again)."""
        raise NotImplementedError

    def save_pretrained(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "ImageCodec":
        return self

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pictures -> latents, sampled from the posterior with ``generator`` (as SD training does)."""
        return sample_latents(*self.moments(pixels), generator)


def sample_latents(mean: torch.Tensor, std: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from N(mean, std^2) (``mean`` when std is None); the noise comes from ``generator``'s device."""
    if std is None:
        return mean
    from diffusers.utils.torch_utils import randn_tensor

    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class DiffusersVAE(ImageCodec):
    """A diffusers ``AutoencoderKL`` / ``AutoencoderDC``, frozen, with its scaling and shift factors."""

    def __init__(self, vae: nn.Module):
        name = type(vae).__name__
        if name not in _DIFFUSERS_VAES:
            raise TypeError(f"vae must be one of diffusers' {_DIFFUSERS_VAES}, got {name}")
        self.vae = vae.requires_grad_(False).eval()
        c = vae.config
        self.latent_channels = int(c["latent_channels"])
        self.image_channels = int(c.get("out_channels", c["in_channels"]))
        blocks = c["block_out_channels"] if name == "AutoencoderKL" else c["encoder_block_out_channels"]
        self.downsample = 2 ** (len(blocks) - 1)
        self.scaling_factor = float(c.get("scaling_factor") or 1.0)
        self.shift_factor = float(c.get("shift_factor") or 0.0)

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.vae.encode(pixels.to(self.vae.dtype))
        if hasattr(out, "latent_dist"):  # KL: a diagonal Gaussian posterior
            dist = out.latent_dist
            return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor
        return (out.latent - self.shift_factor) * self.scaling_factor, None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float()

    def describe(self) -> dict:
        return {"class": type(self.vae).__name__, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(str(path), safe_serialization=True)

    def to(self, device: torch.device | str) -> "DiffusersVAE":
        self.vae.to(device)
        return self


@dataclass
class PixelSpace(ImageCodec):
    """The identity codec: pictures are their own latents (``channels`` 1 = grayscale, 3 = RGB)."""

    channels: int = 3

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"pixel space needs 1 (grayscale) or 3 (RGB) channels, got {self.channels}")
        self.latent_channels = self.image_channels = self.channels
        self.downsample = 1

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return pixels, None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float()

    def describe(self) -> dict:
        return {"class": "PixelSpace", "latent_channels": self.channels, "downsample": 1, "scaling_factor": 1.0,
                "shift_factor": 0.0}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps({"_class_name": "PixelSpace", "channels": self.channels}) + "\n")


def load_codec(source: str | os.PathLike, device: torch.device | str = "cpu", *,
               pixel_channels: int | None = None) -> ImageCodec:
    """An image codec from a folder (a diffusers VAE, or a saved :class:`PixelSpace`) or the string
    ``"pixels"`` (pixel space with ``pixel_channels`` channels, the model's latent channels).

    Raises:
        CheckpointError: no such folder, no config.json, a model that is not a supported VAE, or
            weights that are not safetensors.
    """
    if str(source) == PIXEL_SPACE:
        return PixelSpace(pixel_channels or 3)
    path = Path(source)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"vae: no VAE folder (config.json) at {path}")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"vae: {config_file} is not valid JSON: {exc}") from exc
    if class_name == "PixelSpace":
        return PixelSpace(int(json.loads(config_file.read_text())["channels"]))
    if class_name not in _DIFFUSERS_VAES:
        raise CheckpointError(f"vae: {path} holds a {class_name!r}; supported: {_DIFFUSERS_VAES} (diffusers) or "
                              f"{PIXEL_SPACE!r}")
    if not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise CheckpointError(f"vae: {path} has no diffusion_pytorch_model.safetensors (only safetensors weights load)")
    import diffusers

    try:
        vae = getattr(diffusers, class_name).from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"vae: cannot load the {class_name} at {path}: {exc}") from exc
    return DiffusersVAE(vae).to(device)


def check_codec(codec: ImageCodec, latent_channels: int, recorded: dict | None = None, where: str = "vae") -> None:
    """The codec's latents fit the model (``latent_channels``) and, when ``recorded`` (the codec a model
    was trained with) is given, have the same channels, scaling and shift."""
    if codec.latent_channels != latent_channels:
        raise CheckpointError(f"{where}: the VAE makes {codec.latent_channels}-channel latents but the model "
                              f"diffuses {latent_channels} channels")
    if recorded is None:
        return
    now = codec.describe()
    differ = [k for k in ("latent_channels", "scaling_factor", "shift_factor", "downsample")
              if k in recorded and recorded[k] != now.get(k)]
    if differ:
        detail = ", ".join(f"{k} {recorded[k]} vs {now.get(k)}" for k in differ)
        raise CheckpointError(f"{where}: the VAE disagrees with the one the model was trained with ({detail})")


# ----------------------------------------------------------------------------------------------
# Image input of the latent families
# ----------------------------------------------------------------------------------------------


@dataclass
class ResizeCrop:
    """PIL image -> (channels, height, width) float32 in [-1, 1]: resized to cover, centre-cropped.

    Small and picklable, so a data-loader worker runs it (diffusers' ``VaeImageProcessor`` does the work).
    """

    height: int
    width: int
    channels: int = 3

    def __call__(self, image) -> torch.Tensor:
        pixels = self._processor().preprocess(image, height=self.height, width=self.width, resize_mode="crop")
        return pixels[0].float()

    def _processor(self):
        processor = self.__dict__.get("_built")
        if processor is None:  # built once per process (a worker builds its own)
            from diffusers.image_processor import VaeImageProcessor

            processor = VaeImageProcessor(vae_scale_factor=1, do_convert_grayscale=self.channels == 1,
                                          do_convert_rgb=self.channels == 3, resample="lanczos")
            self.__dict__["_built"] = processor
        return processor

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_built"}

    def describe(self) -> dict:
        return {"resize": "cover+centre-crop", "height": self.height, "width": self.width, "channels": self.channels}


class LatentImages:
    """The image input of a latent family: pictures at ``latent_shape`` x the codec's downsampling.

    ``preprocess`` (CPU, picklable) gives pixels; ``encode`` (the training device, batched) gives latents
    sampled from the codec's posterior; ``moments`` is what ``mmfuse prepare`` caches.
    """

    tensor_name = "latent"  # the fast path: a .safetensors image file holding ready latents

    def __init__(self, codec: ImageCodec | None, latent_shape: tuple[int, int, int]):
        C, h, w = latent_shape
        self.codec, self.latent_shape = codec, tuple(latent_shape)
        self.ready_shape = self.latent_shape  # what a ready tensor (fast-path file, cache entry) must be
        self.preprocess = None  # without a codec only ready latents can be read
        if codec is not None:
            check_codec(codec, C)
            self.preprocess = ResizeCrop(h * codec.downsample, w * codec.downsample, codec.image_channels)

    def _codec(self) -> ImageCodec:
        if self.codec is None:
            raise CheckpointError("pictures need a VAE to become latents: give 'vae' (a diffusers VAE folder, or "
                                  "\"pixels\" for pixel space)")
        return self.codec

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._codec().moments(pixels)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._codec().encode(pixels, generator)

    def fingerprint(self) -> dict:
        return {"codec": self._codec().describe(), "preprocess": self.preprocess.describe()}
