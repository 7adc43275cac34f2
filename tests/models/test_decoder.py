"""The lean decoder vs transformers on tiny random checkpoints built here (no download)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmfuse.models import CheckpointError, Decoder, DecoderConfig, from_pretrained, save_pretrained
from mmfuse.models.decoder import PromptLayout
from tests.helpers import rel_err

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_llama(**overrides) -> LlamaForCausalLM:
    cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
               max_position_embeddings=256)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(**overrides) -> Qwen2ForCausalLM:
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, tie_word_embeddings=False)
    cfg.update(overrides)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # transformers initialises biases to 0; random ones make the test meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def tiny_mistral(**overrides):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=5, tie_word_embeddings=False)
    cfg.update(overrides)
    return MistralForCausalLM(MistralConfig(**cfg)).eval()


def tiny_qwen3(**overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    cfg.update(overrides)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
    with torch.no_grad():  # the q / k norms start at 1: random ones make the test meaningful
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def hf_checkpoint(request, tmp_path):
    model = tiny_llama() if request.param == "llama" else tiny_qwen2()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_logits_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = from_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 45))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.logits(ours(ids))
    assert rel_err(got, want) <= 1e-4


def test_gradients_match_transformers(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 17))
    hf(ids).logits.square().mean().backward()
    ours.logits(ours(ids)).square().mean().backward()
    hf_q = hf.model.layers[1].self_attn.q_proj.weight.grad
    ours_q = ours.layers[1].attn.qkv.weights[0].grad[: hf_q.shape[0]]
    assert rel_err(ours_q, hf_q) <= 1e-4
    assert rel_err(ours.embed.weight.grad, hf.model.embed_tokens.weight.grad) <= 1e-4


def test_untied_llama_without_scaling(tmp_path):
    hf = tiny_llama(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    head_dim=None, num_key_value_heads=4)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.lm_head is not None
    ids = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(ids)), hf(ids).logits) <= 1e-4


def test_sharded_checkpoint_and_round_trip_through_transformers(tmp_path):
    hf = tiny_qwen2()
    ours_src = tmp_path / "src"
    hf.save_pretrained(ours_src)
    ours = from_pretrained(ours_src)
    out = tmp_path / "saved"
    save_pretrained(ours, out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    reloaded_hf = Qwen2ForCausalLM.from_pretrained(out).eval()
    reloaded_ours = from_pretrained(out)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(reloaded_hf(ids).logits, want) == 0
        assert rel_err(reloaded_ours.logits(reloaded_ours(ids)), want) <= 1e-4


def test_tied_round_trip_leaves_lm_head_out(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "a")
    save_pretrained(from_pretrained(tmp_path / "a"), tmp_path / "b")
    keys = load_file(tmp_path / "b" / "model.safetensors").keys()
    assert "lm_head.weight" not in keys
    back = LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) == 0


def test_loads_in_bfloat16_on_meta_free_path(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32 and not model.inv_freq.is_meta


def test_kv_cache_prefill_then_decode_equals_full_forward(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model.logits(model(ids))
        model.setup_cache(batch=2, max_len=16)
        prefill = model.logits(model(ids[:, :8], input_pos=torch.arange(8)))
        steps = [model.logits(model(ids[:, i : i + 1], input_pos=torch.tensor([i]))) for i in range(8, 12)]
    assert rel_err(prefill, full[:, :8]) <= 1e-5
    assert rel_err(torch.cat(steps, dim=1), full[:, 8:]) <= 1e-5


@pytest.mark.parametrize("experts", [1, 2])
def test_fill_cache_writes_the_keys_prefill_writes_and_skips_the_last_layers_rest(experts):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, dim=32, hidden_dim=48, num_layers=3, num_heads=4, num_kv_heads=2,
                                  head_dim=8, num_experts=experts)).eval()
    for p in model.parameters():  # random norm weights too: a missed norm would show
        torch.nn.init.normal_(p, std=0.3)
    layout = PromptLayout.of_tokens([torch.randint(0, 50, (n,)) for n in (9, 5)], model.embed)
    if experts > 1:  # a few image-expert positions among the real ones
        layout = dataclasses.replace(layout, modality=(torch.rand(layout.modality.shape) < 0.4).long())
    caches = []
    with torch.no_grad():
        for fill in (model.prefill, model.fill_cache):
            with model.kv_cache(2, 12):
                fill(layout)
                caches.append([(layer.attn.kv_cache.k.clone(), layer.attn.kv_cache.v.clone()) for layer in model.layers])
    for (k0, v0), (k1, v1) in zip(*caches):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert caches[0][-1][0].abs().sum() > 0  # the last layer's keys were written at all

    ran = []
    last = model.layers[-1]
    hooks = [m.register_forward_hook(lambda *a, name=name: ran.append(name))
             for name, m in (("mlp", last.mlp), ("o", last.attn.o), ("final norm", model.norm))]
    with torch.no_grad(), model.kv_cache(2, 12):
        model.fill_cache(layout)
    for h in hooks:
        h.remove()
    assert ran == []


# ------------------------------------------------------------------ strict loading


def _corrupt(path, mutate):
    file = path / "model.safetensors"
    tensors = load_file(file)
    mutate(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"norm.weights.0.*\(63,\)"):
        from_pretrained(tmp_path)


def test_truncated_file_is_reported(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    save_pretrained(from_pretrained(_saved(tiny_qwen2(), tmp_path / "a")), tmp_path / "b", max_shard_bytes=40_000)
    next((tmp_path / "b").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(tmp_path / "b")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}, "rope_type"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config_is_named(tmp_path, change, match):
    tiny_llama().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(tmp_path)


def test_no_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path)
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_forward_rejects_bad_input(tmp_path):
    model = from_pretrained(_saved(tiny_llama(), tmp_path))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 7))
    assert isinstance(model, Decoder)


def _saved(model, path):
    model.save_pretrained(path)
    return path


def test_a_kv_cache_block_leaves_the_model_as_it_was(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    with model.kv_cache(batch=2, max_len=8):
        assert all(layer.attn.kv_cache.k.shape == (2, 2, 8, 32) for layer in model.layers)
    assert all(layer.attn.kv_cache is None for layer in model.layers)
    with pytest.raises(RuntimeError, match="boom"):
        with model.kv_cache(batch=1, max_len=4):
            raise RuntimeError("boom")
    assert all(layer.attn.kv_cache is None for layer in model.layers)  # released on errors too


def test_resize_vocab_keeps_the_old_rows_and_the_logits(tmp_path):
    hf = tiny_llama(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        before = model.logits(model(ids))
        model.resize_vocab(104)
        after = model.logits(model(ids))
    # the old rows are kept bit for bit; the logits over them agree to rounding (a GEMM of another
    # width may block its sums differently, so bitwise equality there is not promised)
    assert torch.equal(model.embed.weight[:101], hf.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:101], hf.lm_head.weight)
    assert after.shape[-1] == 104 and rel_err(after[..., :101], before) <= 1e-6
    assert model.config.vocab_size == 104 and model.lm_head.weight.shape == (104, 64)
    with pytest.raises(ValueError, match="can only grow"):
        model.resize_vocab(50)


@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 8, 64), (40, 64)])  # 1 row, a decode batch, prefill
def test_logits_equal_the_linear_head(shape):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=300, dim=64, hidden_dim=96, num_layers=1, num_heads=2, num_kv_heads=1,
                                  head_dim=32))
    hidden = torch.randn(*shape)
    want = torch.nn.functional.linear(hidden.double(), model.lm_head_weight.double())
    got = model.logits(hidden)
    assert got.shape == (*shape[:-1], 300) and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, want) <= 1e-6
