"""mmfuse.patch / unpatch / to_fusion on tiny random transformers Llama and Qwen2 models (fp32, no download)."""
import copy
import logging
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import mmfuse
from mmfuse.kernels import default_backend, mask_intervals
from mmfuse.models import RMSNorm
from mmfuse.models.fusion import FusionConfig
from mmfuse.models.patch import SwiGLUMLP, patch, to_fusion, unpatch
from tests.helpers import count_calls, rel_err, triton_devices
from tests.models.test_decoder import tiny_llama, tiny_mistral, tiny_qwen2, tiny_qwen3

needs_triton = pytest.mark.skipif("cpu" not in triton_devices(), reason="needs the Triton interpreter")
# llama: tied head, llama3 RoPE; qwen2: QKV biases, GQA 4:1; mistral: a sliding window (5); qwen3: per-head q / k norms
MAKERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "qwen3": tiny_qwen3}
# The forward launcher of each op's Triton backend: counting their calls shows which backend ran.
TRITON_LAUNCHERS = {"rms_norm": ("mmfuse.kernels.rms_norm", "_rms_norm_fwd_triton"),
                    "swiglu": ("mmfuse.kernels.swiglu", "_swiglu_fwd_triton"),
                    "rope": ("mmfuse.kernels.rope", "_rope_triton"),
                    "loss": ("mmfuse.kernels.linear_cross_entropy", "_chunk_triton")}


@pytest.fixture(params=list(MAKERS))
def arch(request):
    return request.param


@pytest.fixture
def triton_launches(monkeypatch) -> Counter:
    """Calls of each op's Triton forward launcher: which backend a module really ran."""
    return count_calls(monkeypatch, TRITON_LAUNCHERS)


def batch(model, B: int = 2, L: int = 12):
    ids = torch.randint(3, model.config.vocab_size, (B, L))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[1, -3:] = -100  # padding
    return ids, labels


def pair(arch: str):
    """(unpatched, patched copy) in training mode, and the report."""
    ref = MAKERS[arch]().train()
    ours = copy.deepcopy(ref)
    return ref, ours, patch(ours)


def mmfuse_ops(fn) -> Counter:
    """The mmfuse custom ops ``fn`` runs, by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("mmfuse::"))


def assert_same_training_step(ref, ours, ids, labels, **kwargs):
    """Same loss and same gradient of every parameter (training mode, fused loss, no logits)."""
    want = ref(ids, labels=labels, **kwargs)
    got = ours(ids, labels=labels, **kwargs)
    assert got.logits is None  # the fused loss never builds the (B, L, V) logits in training
    assert rel_err(got.loss, want.loss) <= 1e-4
    want.loss.backward()
    got.loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and rel_err(p.grad, theirs[name].grad) <= 1e-4, name
    ref.zero_grad()
    ours.zero_grad()


@pytest.mark.parametrize("arch, backend, how", [
    ("llama", "torch", "default_backend"),
    ("qwen2", "torch", "default_backend"),
    pytest.param("llama", "triton", "default_backend", marks=needs_triton),
    pytest.param("qwen2", "triton", "patch(backend=...)", marks=needs_triton),
])
def test_patched_matches_unpatched(arch, backend, how, triton_launches):
    ref = MAKERS[arch]().train()
    ours = copy.deepcopy(ref)
    patch(ours, backend=backend if how == "patch(backend=...)" else None)
    ids, labels = batch(ref)
    with default_backend(backend if how == "default_backend" else None):
        with torch.no_grad():
            assert rel_err(ours(ids).logits, ref(ids).logits) <= 1e-4
        assert_same_training_step(ref, ours, ids, labels)
        assert_same_training_step(ref, ours, ids, labels, num_items_in_batch=torch.tensor(13))
    if backend == "triton":
        assert set(triton_launches) == set(TRITON_LAUNCHERS)
    else:
        assert not triton_launches


def test_report_counts_and_the_ops_that_run(arch, caplog):
    ref, ours, report = pair(arch)
    norms = 5 + 4 * (arch == "qwen3")  # 2 layers x 2 norms + final norm (+ Qwen3's q / k norms per layer)
    assert report.counts == {"rms_norm": norms, "mlp": 2, "rope": 2, "loss": 1}
    assert str(report) == f"mmfuse.patch({type(ref).__name__}): rms_norm {norms}, mlp 2, rope 2, loss 1 (backend auto)"
    ids, labels = batch(ref)
    ops = mmfuse_ops(lambda: ours(ids, labels=labels))
    assert ops == {"mmfuse::rms_norm_fwd": norms, "mmfuse::swiglu_fwd": 2, "mmfuse::rope": 2,
                   "mmfuse::linear_cross_entropy_fwd": 1}
    assert not mmfuse_ops(lambda: ref(ids, labels=labels))

    partial = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="mmfuse.models.patch"):
        report = patch(partial, mlp=False, loss=False)
    assert report.counts == {"rms_norm": norms, "mlp": 0, "rope": 2, "loss": 0}
    assert str(report) in caplog.text
    assert type(partial.model.layers[0].mlp) is type(ref.model.layers[0].mlp)
    assert mmfuse_ops(lambda: partial(ids, labels=labels)) == {"mmfuse::rms_norm_fwd": norms, "mmfuse::rope": 2}


def test_bare_model_has_no_loss_to_swap(arch):
    causal = MAKERS[arch]()
    bare = type(causal.model)(causal.config).eval()  # LlamaModel, Qwen2Model, MistralModel, Qwen3Model
    ids, _ = batch(causal)
    with torch.no_grad():
        want = bare(ids).last_hidden_state
        assert patch(bare).counts == {"rms_norm": 5 + 4 * (arch == "qwen3"), "mlp": 2, "rope": 2, "loss": 0}
        assert rel_err(bare(ids).last_hidden_state, want) <= 1e-4


def test_parameters_are_shared_and_the_checkpoint_is_unchanged(tmp_path):
    model = tiny_llama().train()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before patching
    gate = model.model.layers[0].mlp.gate_proj
    patch(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, RMSNorm) and layer.input_layernorm.weight is params[
        "model.layers.0.input_layernorm.weight"]
    assert isinstance(layer.mlp, SwiGLUMLP) and layer.mlp.gate_proj is gate
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids, labels = batch(model)
    before = model.model.norm.weight.detach().clone()
    model(ids, labels=labels).loss.backward()
    optimizer.step()
    assert not torch.equal(model.model.norm.weight, before)  # the optimizer moves what the swapped norm uses

    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, model(ids).logits) <= 1e-4


def test_unpatch_restores_modules_and_outputs(arch):
    model = MAKERS[arch]()
    modules = dict(model.named_modules())
    ids, _ = batch(model)
    with torch.no_grad():
        want = model(ids).logits
    patch(model)
    assert type(model.model.norm) is RMSNorm
    unpatch(model)
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[name] is m for name, m in modules.items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    patch(model)  # patchable again
    unpatch(model)


def test_patching_twice_and_unpatching_nothing_are_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    patch(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model.model, rope=False)  # a submodel of a patched model
    unpatch(model)
    other = tiny_llama()
    other.model.layers[1].self_attn.forward = lambda *a, **k: None  # some other library's patch
    with pytest.raises(ValueError, match="instance-level forward"):
        patch(other)
    assert type(other.model.norm) is not RMSNorm  # validated before anything changed


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        patch(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(TypeError, match="nn.Module"):
        patch("llama")
    gelu = tiny_llama(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        patch(gelu)
    assert "_mmfuse_patch" not in gelu.__dict__ and type(gelu.model.norm) is not RMSNorm  # left as it was
    assert patch(gelu, mlp=False).counts["mlp"] == 0  # the rest is still supported
    biased = tiny_llama(mlp_bias=True)  # the swapped MLP applies transformers' own Linear layers, biases included
    ref = copy.deepcopy(biased)
    assert patch(biased).counts["mlp"] == 2
    ids, _ = batch(ref)
    with torch.no_grad():
        assert rel_err(biased(ids).logits, ref(ids).logits) <= 1e-5
    with pytest.raises(ValueError, match="backend"):
        patch(tiny_llama(), backend="cuda")
    custom = tiny_llama()
    custom.loss_function = lambda **kwargs: torch.tensor(0.0)
    with pytest.raises(ValueError, match="loss=False"):
        patch(custom)


def test_generate_greedy_tokens_unchanged(arch):
    ref = MAKERS[arch]()
    ours = copy.deepcopy(ref)
    patch(ours)
    ids, _ = batch(ref, B=2, L=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_torch_compile():
    ref, ours, _ = pair("llama")
    ids, labels = batch(ref)
    compiled = torch.compile(ours, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, ref(ids).logits) <= 1e-4
    assert rel_err(compiled(ids, labels=labels).loss, ref(ids, labels=labels).loss) <= 1e-4


def test_outputs_with_labels_outside_training(arch):
    ref, ours, _ = pair(arch)
    ref.eval()
    ours.eval()
    ids, labels = batch(ref)
    with torch.no_grad():
        want = ref(ids, labels=labels)
        got = ours(ids, labels=labels)  # evaluation: logits as transformers gives them, beside the fused loss
        assert rel_err(got.logits, want.logits) <= 1e-4 and rel_err(got.loss, want.loss) <= 1e-4
        last = ours(ids, labels=labels, logits_to_keep=1).logits
        assert last.shape == (2, 1, ref.config.vocab_size) and rel_err(last, want.logits[:, -1:]) <= 1e-4
        loss, logits = ours(ids, None, None, None, None, labels, return_dict=False)[:2]  # positional labels
        assert rel_err(loss, want.loss) <= 1e-4 and rel_err(logits, want.logits) <= 1e-4
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        assert rel_err(ours(ids, shift_labels=shift).loss, want.loss) <= 1e-4
    with pytest.raises(TypeError, match="multiple values"):
        ours(ids, input_ids=ids, labels=labels)


def test_deepcopy_of_a_patched_model_is_independent():
    model = tiny_llama()
    patch(model)
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    assert clone.model.layers[0].self_attn.forward.__self__ is clone.model.layers[0].self_attn
    unpatch(clone)
    assert type(clone.model.norm) is not RMSNorm and type(model.model.norm) is RMSNorm


def test_public_names_are_lazy_attributes_of_mmfuse():
    assert mmfuse.patch is patch and mmfuse.apply_mmfuse is patch
    assert mmfuse.unpatch is unpatch and mmfuse.to_fusion is to_fusion
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmfuse.nope


# ----------------------------------------------------------------------------------------------
# to_fusion
# ----------------------------------------------------------------------------------------------

FUSION = FusionConfig(latent_channels=4, latent_size=4, patch_size=2)


def test_to_fusion_keeps_text_logits_and_freezes_text(arch):
    hf = MAKERS[arch]()
    if arch in ("mistral", "qwen3"):  # mmfuse's decoder has neither sliding windows nor q / k norms
        with pytest.raises(ValueError, match="to_fusion takes transformers' LlamaForCausalLM, Qwen2ForCausalLM"):
            to_fusion(hf, FUSION)
        return
    fusion = to_fusion(hf, FUSION)
    ids, _ = batch(hf)
    modality = torch.zeros_like(ids)
    kv_start, kv_end = mask_intervals(modality)
    with torch.no_grad():
        hidden, _ = fusion(ids, modality, torch.zeros(0, 4, 4, 4), torch.zeros(0, dtype=torch.long), kv_start, kv_end)
        assert rel_err(fusion.decoder.logits(hidden), hf(ids).logits) <= 1e-4
    params = dict(fusion.named_parameters())
    text = [n for n in params
            if n.endswith((".weights.0", ".biases.0")) or n.startswith(("decoder.embed.", "decoder.lm_head."))]
    image = [n for n in params if n.endswith((".weights.1", ".biases.1"))]
    assert len(text) == len(image) + 1 + (arch == "qwen2")  # + embeddings (+ untied LM head)
    assert not any(params[n].requires_grad for n in text) and all(params[n].requires_grad for n in image)
    assert params["patch_in.weight"].requires_grad
    hf_ptrs = {p.data_ptr() for p in hf.parameters()}
    assert not any(p.data_ptr() in hf_ptrs for p in fusion.parameters())  # the HF model is left alone


def test_to_fusion_of_a_patched_model_and_bad_input():
    hf = tiny_llama()
    want = dict(to_fusion(hf, FUSION).state_dict())
    patch(hf)
    got = to_fusion(hf, FUSION).state_dict()
    text = [k for k in want if k.startswith("decoder.")]
    assert text and all(torch.equal(got[k], want[k]) for k in text)
    with pytest.raises(ValueError, match="LlamaModel is not supported"):
        to_fusion(hf.model)


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_a_llava_family_vlm_gets_its_language_model_patched(kind):
    from tests.models.test_llava import PICTURES, inputs, tiny, tokenizer

    tok = tokenizer()
    ref = tiny(kind, tok)
    ours = copy.deepcopy(ref)
    enc = inputs("next" if kind == "next" else "onevision", tok, None if kind == "next" else _ours(ref),
                 ["what is this <image>", "<image> a red"], PICTURES[:2])
    report = patch(ours)
    inner = type(ref.model.language_model).__name__
    assert report.model == f"{type(ref).__name__} ({inner})" and report.counts["loss"] == 0
    assert report.counts["rms_norm"] == 5 and report.counts["mlp"] == 2 and report.counts["rope"] == 2
    with torch.no_grad():
        assert rel_err(ours(**enc).logits, ref(**enc).logits) <= 1e-5
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(ours.generate(**enc, **kwargs), ref.generate(**enc, **kwargs))
    real = enc["attention_mask"].bool()
    ref(**enc).logits[real].square().mean().backward()
    ours(**enc).logits[real].square().mean().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = theirs[name].grad
        if want is None:
            continue
        if want.abs().max() < 1e-9:  # a key bias: softmax ignores it, its gradient is rounding noise on both sides
            assert p.grad.abs().max() < 1e-9, name
        else:
            assert rel_err(p.grad, want) <= 1e-4, name
    with pytest.raises(ValueError, match="already patched"):
        patch(ours)
    unpatch(ours)
    assert type(ours.model.language_model.norm) is type(ref.model.language_model.norm)
    assert "_mmfuse_patch" not in ours.__dict__ and "_mmfuse_patch" not in ours.model.language_model.__dict__


def _ours(hf):
    """mmfuse's VLM on the same weights: it counts the image features that expand the placeholders."""
    import tempfile

    from mmfuse.models import from_pretrained

    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        return from_pretrained(path)


def test_qwen2_5_vl_gets_its_language_model_and_vit_patched(tmp_path):
    """Norms and SwiGLU MLPs of both (the ViT's have biases), the language model's RoPE (multimodal: its
    tables come recomposed from transformers' rotary embedding); the ViT's 2D RoPE is kept, by name."""
    from tests.models.test_qwen_vl import PICTURES, TEXTS, prompts_with_images, tiny

    ref = tiny(tmp_path)
    ours = copy.deepcopy(ref)
    report = patch(ours)
    assert report.model == ("Qwen2_5_VLForConditionalGeneration (Qwen2_5_VLTextModel, "
                            "Qwen2_5_VisionTransformerPretrainedModel)")
    # LM: 2 layers x 2 + final; ViT: 3 blocks x 2 + the merger's
    assert report.counts == {"rms_norm": 5 + 7, "mlp": 2 + 3, "rope": 2, "loss": 0}
    assert "2D RoPE" in report.kept["rope"] and "computes its own loss" in report.kept["loss"]
    enc = prompts_with_images(PICTURES, TEXTS)
    with torch.no_grad():
        assert rel_err(ours(**enc).logits, ref(**enc).logits) <= 1e-5
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(**enc, **kwargs), ref.generate(**enc, **kwargs))
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    ref.train(), ours.train()
    want, got = ref(**enc, labels=labels).loss, ours(**enc, labels=labels).loss
    assert rel_err(got, want) <= 1e-5
    want.backward()
    got.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if theirs[name].grad is not None:
            assert rel_err(p.grad, theirs[name].grad) <= 1e-4, name
    unpatch(ours)
    assert type(ours.model.visual.blocks[0].norm1) is type(ref.model.visual.blocks[0].norm1)
    assert all("forward" not in m.__dict__ and "_mmfuse_patch" not in m.__dict__ for m in ours.modules())


def test_a_siglip_vision_model_has_nothing_to_swap():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=8))
    with pytest.raises(ValueError, match="SiglipVisionModel has nothing mmfuse.patch swaps .*LayerNorm.*"
                                         "attn_implementation='mmfuse'"):
        patch(model)
    assert "_mmfuse_patch" not in model.__dict__
