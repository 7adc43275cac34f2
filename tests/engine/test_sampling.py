"""The cached diffusion sampler gives the same image as the sampler that recomputes the prompt every step."""
import pytest
import torch

from mmfuse.engine.sampling import sample_images, save_png
from mmfuse.models.fusion import LlamaFusion
from tests.helpers import rel_err
from tests.models.test_fusion import FUSION, base  # noqa: F401  (fixture)


@pytest.fixture
def fusion(base):  # noqa: F811
    model = LlamaFusion.from_decoder(base, FUSION).eval()
    with torch.no_grad():  # a trained-looking output layer, so the prediction depends on the prompt
        model.patch_out.weight.normal_(0, 0.05)
    return model


def prompts():
    return torch.tensor([[7, 8, 9, FUSION.boi_token_id], [5, 5, 6, FUSION.boi_token_id]])


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cached_equals_recomputed(fusion, guidance_scale):
    kwargs = dict(num_steps=4, guidance_scale=guidance_scale)
    cached = sample_images(fusion, prompts(), generator=torch.Generator().manual_seed(0), **kwargs)
    recomputed = sample_images(fusion, prompts(), generator=torch.Generator().manual_seed(0), recompute=True, **kwargs)
    assert cached.shape == (2, 4, 8, 8) and torch.isfinite(cached).all()
    assert rel_err(cached, recomputed) <= 1e-5


def test_prompt_changes_the_image_and_left_padding_does_not_leak(fusion):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    same_noise = noise[:1].expand(2, -1, -1, -1)
    both = sample_images(fusion, prompts(), num_steps=2, noise=same_noise)
    assert rel_err(both[0], both[1]) > 1e-3  # same noise, different prompts: different images
    short = torch.tensor([9, FUSION.boi_token_id])
    alone = sample_images(fusion, [short], num_steps=2, noise=noise[:1])
    # Batched beside a longer prompt, the short one is left-padded; padding must not change its image.
    batched = sample_images(fusion, [short, prompts()[0]], num_steps=2, noise=noise)
    assert rel_err(batched[:1], alone) <= 1e-5
    with_zeros = sample_images(fusion, [torch.tensor([0, 0, 9, FUSION.boi_token_id])], num_steps=2, noise=noise[:1])
    assert rel_err(with_zeros, alone) > 1e-4  # while real tokens in those places do change it


def test_requires_boi_at_the_end(fusion):
    with pytest.raises(ValueError, match="BOI"):
        sample_images(fusion, torch.tensor([[7, 8]]), num_steps=1)


def test_save_png(tmp_path):
    save_png(torch.rand(5, 1, 8, 8), tmp_path / "grid.png", nrow=3)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (3 * 9 + 1, 2 * 9 + 1)
