"""LlamaFusion built from a tiny random transformers Llama checkpoint."""
import pytest
import torch

from mmfuse.engine.packing import PackedBatch
from mmfuse.kernels import default_backend, mask_intervals
from mmfuse.models import from_pretrained
from mmfuse.models.fusion import FusionConfig, LlamaFusion, load_fusion, patchify, save_fusion, unpatchify
from tests.helpers import rel_err, triton_devices
from tests.models.test_decoder import tiny_llama

FUSION = FusionConfig(latent_channels=4, latent_size=8, patch_size=2, boi_token_id=3, eoi_token_id=4)


@pytest.fixture
def base(tmp_path):
    tiny_llama(num_hidden_layers=2).save_pretrained(tmp_path)
    return from_pretrained(tmp_path)


def interleaved_batch(fusion: FusionConfig, vocab: int, gen: torch.Generator, image_mask=None) -> PackedBatch:
    """Two rows: text BOI [image] EOI text | text only, with labels and mask intervals (built by hand)."""
    n = fusion.patches_per_image
    row0 = [5, 6, 7, fusion.boi_token_id] + [0] * n + [fusion.eoi_token_id, 8, 9]
    L = len(row0)
    input_ids = torch.tensor([row0, torch.randint(5, vocab, (L,), generator=gen).tolist()])
    modality = torch.zeros(2, L, dtype=torch.long)
    modality[0, 4 : 4 + n] = 1
    kv_start, kv_end = mask_intervals(modality)  # one image span, id 1
    labels = input_ids.masked_fill(modality == 1, -100)
    latents = torch.randn(1, fusion.latent_channels, fusion.latent_size, fusion.latent_size, generator=gen)
    mask = torch.tensor([True]) if image_mask is None else image_mask
    return PackedBatch(input_ids=input_ids, modality=modality, span_ids=modality, doc_ids=torch.zeros_like(modality),
                       position_ids=torch.arange(L).expand(2, L), labels=labels, kv_start=kv_start, kv_end=kv_end,
                       images=latents, image_loss_mask=mask)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 4, 8, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 16, 16)
    assert torch.equal(p[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # patch (0, 1): channels, then pixels
    assert torch.equal(unpatchify(p, 4, 8, 2), x)


def test_text_only_logits_equal_the_base_decoder(base):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    ids = torch.randint(0, 101, (2, 23))
    modality = torch.zeros_like(ids)
    kv_start, kv_end = mask_intervals(modality)
    with torch.no_grad():
        want = base.logits(base(ids))
        hidden, noise = fusion(ids, modality, torch.zeros(0, 4, 8, 8), torch.zeros(0, dtype=torch.long), kv_start, kv_end)
    assert noise.shape == (0, 4, 8, 8)
    assert torch.equal(fusion.decoder.logits(hidden), want)


def test_frozen_text_gets_no_gradient_and_image_path_trains(base):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    batch = interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0))
    objective = fusion.training_loss(batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(objective.total) and set(objective.components) == {"lm", "diffusion"}
    objective.total.backward()
    for name, p in fusion.named_parameters():
        text = name.endswith((".weights.0", ".biases.0")) or ".embed." in name or name.startswith("decoder.embed")
        if text:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
    image_q = fusion.decoder.layers[0].attn.qkv.weights[1]
    assert image_q.grad is not None and image_q.grad.abs().sum() > 0
    assert fusion.patch_in.weight.grad.abs().sum() > 0


def test_transfusion_trains_text_too(base):
    fusion = LlamaFusion.from_decoder(base, FusionConfig(**{**FUSION.__dict__, "train_text": True}))
    fusion.training_loss(interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0))).total.backward()
    assert fusion.decoder.layers[0].attn.qkv.weights[0].grad.abs().sum() > 0


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch_backend(base):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    batch = interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0))
    losses, grads = [], []
    for backend in ("torch", "triton"):
        fusion.zero_grad()
        with default_backend(backend):
            objective = fusion.training_loss(batch, torch.Generator().manual_seed(1))
            objective.total.backward()
        losses.append(objective.total.detach())
        grads.append(fusion.decoder.layers[1].mlp.gate_up.weights[1].grad.clone())
    assert torch.isfinite(losses[1])
    assert rel_err(losses[1], losses[0]) <= 1e-4 and rel_err(grads[1], grads[0]) <= 1e-4


def test_native_checkpoint_round_trip(base, tmp_path):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    save_fusion(fusion, tmp_path / "fusion")
    back = load_fusion(tmp_path / "fusion")
    batch = interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = fusion.training_loss(batch, torch.Generator().manual_seed(2)).total
        b = back.training_loss(batch, torch.Generator().manual_seed(2)).total
    assert torch.equal(a, b)
    assert not back.decoder.layers[0].attn.o.weights[0].requires_grad


def test_rejects_mismatched_images(base):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    b = interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0))
    ids, modality, s, e = b.input_ids, b.modality, b.kv_start, b.kv_end
    with pytest.raises(ValueError, match="image positions"):
        fusion(ids, modality, torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), s, e)
    with pytest.raises(ValueError, match="noisy_latents"):
        fusion(ids, modality, torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), s, e)


def test_conditioning_images_enter_clean(base):
    fusion = LlamaFusion.from_decoder(base, FUSION)
    batch = interleaved_batch(FUSION, 101, torch.Generator().manual_seed(0), image_mask=torch.tensor([False]))
    seen = {}
    real_forward = fusion.forward

    def spy(input_ids, modality, noisy_latents, timesteps, *args, **kwargs):
        seen.update(latents=noisy_latents, timesteps=timesteps)
        return real_forward(input_ids, modality, noisy_latents, timesteps, *args, **kwargs)

    fusion.forward = spy
    objective = fusion.training_loss(batch)
    assert torch.equal(seen["latents"], batch.images) and seen["timesteps"].tolist() == [0]
    assert objective.components["diffusion"] == 0  # the only image is excluded from the diffusion loss


UNET = FusionConfig(latent_channels=4, latent_size=8, patch_size=2, boi_token_id=3, eoi_token_id=4, patchify="unet",
                    unet_width=16, unet_groups=4)


def test_unet_patchifier_trains_and_keeps_text_exact(base):
    fusion = LlamaFusion.from_decoder(base, UNET)
    assert not hasattr(fusion, "patch_in") and fusion.unet.conv_out.weight.abs().sum() == 0
    assert all(torch.isfinite(p).all() for p in fusion.unet.parameters())  # initialised, not left empty
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        hidden, _ = fusion(ids, torch.zeros_like(ids), torch.zeros(0, 4, 8, 8), torch.zeros(0, dtype=torch.long),
                           *mask_intervals(torch.zeros_like(ids)))
        assert torch.equal(fusion.decoder.logits(hidden), base.logits(base(ids)))
    batch = interleaved_batch(UNET, 101, torch.Generator().manual_seed(0))
    objective = fusion.training_loss(batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(objective.total)
    objective.total.backward()
    assert fusion.unet.down_res[0].conv1.weight.grad.abs().sum() > 0  # the down path feeds the transformer
    assert fusion.unet.conv_out.weight.grad.abs().sum() > 0


def test_unet_skip_connections_reach_the_prediction(base):
    fusion = LlamaFusion.from_decoder(base, UNET)
    torch.nn.init.normal_(fusion.unet.conv_out.weight, std=0.1)
    latents = torch.randn(1, 4, 8, 8)
    temb = torch.randn(1, fusion.decoder.config.dim)
    tokens, skips = fusion.unet.encode(latents, temb)
    assert tokens.shape == (1, UNET.patches_per_image, fusion.decoder.config.dim) and len(skips) == 1
    a = fusion.unet.decode(tokens, temb, skips)
    b = fusion.unet.decode(tokens, temb, [torch.zeros_like(s) for s in skips])
    assert a.shape == latents.shape and not torch.allclose(a, b)


def test_config_rejects_bad_patchify():
    with pytest.raises(ValueError, match="patchify"):
        FusionConfig(patchify="conv")
    with pytest.raises(ValueError, match="power of 2"):
        FusionConfig(latent_size=12, patch_size=3, patchify="unet")


def test_a_text_only_batch_trains_the_lm_alone(base):
    from mmfuse.engine.packing import pack

    fusion = LlamaFusion.from_decoder(base, FUSION)
    batch = pack([[list(range(5, 20))], [list(range(30, 40))]], 16, FUSION.patches_per_image, 3, 4)
    objective = fusion.training_loss(batch)
    want = torch.nn.functional.cross_entropy(base.logits(base(batch.input_ids, position_ids=batch.position_ids,
                                                                kv_start=batch.kv_start, kv_end=batch.kv_end))[:, :-1]
                                             .reshape(-1, base.config.vocab_size), batch.labels[:, 1:].reshape(-1))
    assert rel_err(objective.components["lm"], want) <= 1e-5 and float(objective.components["diffusion"]) == 0
