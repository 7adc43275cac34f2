"""The SigLIP vision tower vs transformers on tiny random checkpoints built here (no download)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel
from transformers import SiglipVisionConfig as HFSiglipVisionConfig
from transformers import SiglipVisionModel

from mmfuse.kernels._common import default_backend
from mmfuse.models.hf_io import CheckpointError
from mmfuse.models.siglip import SiglipVisionTower, load_siglip, pool_to_tokens, save_siglip
from tests.helpers import rel_err

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7)


def _randomise(model):
    # transformers starts biases at 0 and LayerNorms at identity: random ones make the comparison meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def tiny_vision(**overrides) -> SiglipVisionModel:
    return _randomise(SiglipVisionModel(HFSiglipVisionConfig(**{**TINY, **overrides})))


def tiny_full() -> SiglipModel:
    text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return _randomise(SiglipModel(SiglipConfig(text_config=text, vision_config=TINY)))


def reference(hf_vision, pixels):
    """transformers' last_hidden_state in float64 (weights as stored, upcast)."""
    model = SiglipVisionModel(hf_vision.config).double().eval()
    model.load_state_dict(hf_vision.state_dict())
    with torch.no_grad():
        return model(pixels.double()).last_hidden_state


def pixels_for(config, batch=2, extra=0):
    return torch.randn(batch, config.num_channels, config.image_size + extra, config.image_size + extra)


@pytest.mark.parametrize(
    "overrides,extra",
    [({}, 0), ({"hidden_act": "gelu", "vision_use_head": False}, 0), ({"image_size": 31, "patch_size": 6}, 0),
     ({}, 3)],  # 31 // 6: the conv drops the remainder; extra: a 31-pixel image on a 28-pixel grid, same
)
def test_matches_transformers(tmp_path, overrides, extra):
    hf = tiny_vision(**overrides)
    hf.save_pretrained(tmp_path)
    ours = load_siglip(tmp_path)
    pixels = pixels_for(hf.config, extra=extra)
    with torch.no_grad():
        got = ours(pixels)
    want = reference(hf, pixels)
    assert got.shape == (2, (hf.config.image_size // hf.config.patch_size) ** 2, 32)
    assert rel_err(got, want) <= 1e-4
    # float64 against float64 sees what fp32 rounding hides (gelu's tanh approximation moves it ~5e-5)
    with torch.no_grad():
        assert rel_err(load_siglip(tmp_path, dtype=torch.float64)(pixels.double()), want) <= 1e-10


def test_gradients_match_transformers(tmp_path):
    hf = tiny_vision()
    hf.save_pretrained(tmp_path)
    ours = load_siglip(tmp_path)
    ref = SiglipVisionModel(hf.config).double()
    ref.load_state_dict(hf.state_dict())
    pixels = pixels_for(hf.config).requires_grad_()
    pixels_ref = pixels.detach().double().requires_grad_()
    weight = torch.randn(2, 16, 32)
    (ours(pixels) * weight).sum().backward()
    (ref(pixels_ref).last_hidden_state * weight.double()).sum().backward()
    attn = ref.encoder.layers[0].self_attn
    hf_qkv = torch.cat([attn.q_proj.weight.grad, attn.k_proj.weight.grad, attn.v_proj.weight.grad])
    pairs = [(pixels.grad, pixels_ref.grad), (ours.layers[0].attn.qkv.weight.grad, hf_qkv),
             (ours.pos_embed.grad, ref.embeddings.position_embedding.weight.grad),
             (ours.patch_embed.weight.grad, ref.embeddings.patch_embedding.weight.grad),
             (ours.layers[1].fc1.bias.grad, ref.encoder.layers[1].mlp.fc1.bias.grad)]
    for got, want in pairs:
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= 1e-4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_triton_backend_through_the_interpreter(tmp_path):
    hf = tiny_vision(hidden_size=64)  # head dim 32: one the Triton kernel takes
    hf.save_pretrained(tmp_path)
    ours = load_siglip(tmp_path)
    pixels = pixels_for(hf.config).requires_grad_()
    with default_backend("triton"):
        out = ours(pixels)
        out.square().sum().backward()
    assert rel_err(out, reference(hf, pixels.detach())) <= 1e-4
    grad_triton = pixels.grad.clone()
    pixels.grad = None
    ours(pixels).square().sum().backward()  # the torch backend
    assert rel_err(grad_triton, pixels.grad) <= 1e-4


def test_loads_the_vision_tower_of_a_full_siglip_checkpoint(tmp_path):
    full = tiny_full()
    full.save_pretrained(tmp_path)
    assert any(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    ours = load_siglip(tmp_path)
    pixels = pixels_for(full.config.vision_config)
    with torch.no_grad():
        assert rel_err(ours(pixels), reference(full.vision_model, pixels)) <= 1e-4


def test_loads_a_transformers_4_layout(tmp_path):
    hf = tiny_vision()
    hf.save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda t: t.update({f"vision_model.{k}": t.pop(k) for k in list(t)}))
    pixels = pixels_for(hf.config)
    with torch.no_grad():
        assert rel_err(load_siglip(tmp_path)(pixels), reference(hf, pixels)) <= 1e-4


def test_save_round_trip_through_transformers(tmp_path):
    hf = tiny_vision()
    hf.save_pretrained(tmp_path / "src")
    save_siglip(load_siglip(tmp_path / "src"), tmp_path / "out")
    back, info = SiglipVisionModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pixels = pixels_for(hf.config)
    with torch.no_grad():
        assert rel_err(back.eval()(pixels).last_hidden_state, hf(pixels).last_hidden_state) == 0
        assert rel_err(load_siglip(tmp_path / "out")(pixels), reference(hf, pixels)) <= 1e-4


def test_loads_in_bfloat16(tmp_path):
    hf = tiny_vision()
    hf.save_pretrained(tmp_path)
    ours = load_siglip(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in ours.parameters())
    pixels = pixels_for(hf.config)
    with torch.no_grad():
        out = ours(pixels)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(hf, pixels)) <= 2e-2


# ------------------------------------------------------------------ pooling to MetaMorph's tokens


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of half-pixel (align_corners=False) linear resampling, edges clamped."""
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        a[i, lo] += 1 - (src - lo)
        a[i, hi] += src - lo
    return a


def pool_reference(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    B, N, C = features.shape
    side, out = math.isqrt(N), math.isqrt(num_tokens)
    grid = features.double().reshape(B, side, side, C)
    a = bilinear_matrix(side, out)
    pooled = torch.einsum("yi,xj,bijc->byxc", a, a, grid).reshape(B, num_tokens, C)
    return pooled / pooled.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("N,num_tokens,dtype", [(729, 64, torch.float32), (16, 4, torch.float32),
                                                (9, 16, torch.float32), (729, 64, torch.bfloat16), (1, 1, torch.float32)])
def test_pool_to_tokens(N, num_tokens, dtype):
    features = torch.randn(3, 7, N).transpose(1, 2).to(dtype)  # non-contiguous (B, N, C)
    out = pool_to_tokens(features, num_tokens)
    assert out.shape == (3, num_tokens, 7) and out.dtype == dtype
    assert rel_err(out, pool_reference(features, num_tokens)) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_pool_to_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="N=10"):
        pool_to_tokens(torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match="num_tokens"):
        pool_to_tokens(torch.randn(1, 9, 4), num_tokens=63)
    with pytest.raises(ValueError, match="features"):
        pool_to_tokens(torch.randn(9, 4))
    with pytest.raises(TypeError, match="features"):
        pool_to_tokens(torch.ones(1, 9, 4, dtype=torch.int64))


# ------------------------------------------------------------------ strict loading and bad input


def _corrupt(path, mutate):
    file = path / "model.safetensors"
    tensors = load_file(file)
    mutate(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "full,mutate,match",
    [
        (False, lambda t: t.pop("encoder.layers.1.self_attn.k_proj.bias"), "encoder.layers.1.self_attn.k_proj.bias"),
        (False, lambda t: t.update({"encoder.layers.0.extra.weight": torch.zeros(2)}), "encoder.layers.0.extra.weight"),
        (False, lambda t: t.update({"post_layernorm.weight": torch.ones(31)}), r"post_norm.weight.*\(31,\)"),
        (False, lambda t: t.update({"encoder.layers.0.self_attn.v_proj.weight": torch.ones(31, 32)}),
         r"layers.0.attn.qkv.weight.*\(95, 32\)"),
        (False, lambda t: t.update({"encoder.layers.0.self_attn.v_proj.weight": torch.ones(32, 31)}),
         r"v_proj.weight.*\(32, 31\)"),
        (True, lambda t: t.pop("vision_model.post_layernorm.bias"), "vision_model.post_layernorm.bias"),
        (True, lambda t: t.update({"vision_model.extra": torch.zeros(2)}), "vision_model.extra"),
    ],
)
def test_malformed_checkpoint_is_named(tmp_path, full, mutate, match):
    (tiny_full() if full else tiny_vision()).save_pretrained(tmp_path)
    _corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=match):
        load_siglip(tmp_path)


def test_head_tensors_are_unexpected_when_the_config_has_no_head(tmp_path):
    tiny_vision().save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: cfg.update(vision_use_head=False))
    with pytest.raises(CheckpointError, match=r"unexpected.*head.attention.in_proj_bias"):
        load_siglip(tmp_path)


@pytest.mark.parametrize(
    "full,change,match",
    [
        (False, {"model_type": "bert"}, "model_type"),
        (False, {"hidden_act": "relu"}, "hidden_act"),
        (True, {"hidden_act": "relu"}, "vision_config.hidden_act"),
        (False, {"image_size": [28, 35]}, "image_size"),
        (False, {"attention_dropout": 0.1}, "attention_dropout"),
        (False, {"num_attention_heads": 3}, "num_attention_heads"),
    ],
)
def test_unsupported_config_is_named(tmp_path, full, change, match):
    (tiny_full() if full else tiny_vision()).save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda cfg: (cfg["vision_config"] if full and "model_type" not in change else cfg).update(change))
    with pytest.raises(CheckpointError, match=match):
        load_siglip(tmp_path)


def test_forward_rejects_bad_input(tmp_path):
    hf = tiny_vision()
    hf.save_pretrained(tmp_path)
    model = load_siglip(tmp_path)
    assert isinstance(model, SiglipVisionTower)
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"pixel_values must be 28x28.*got 35x28"):
        model(torch.randn(2, 3, 35, 28))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 28, 28))
    with pytest.raises(TypeError, match="pixel_values"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
