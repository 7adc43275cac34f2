"""attn_implementation="mmfuse" takes every mask transformers hands over: interval masks natively (bool,
float additive, 4D custom, Mistral's sliding window), any other valid mask through transformers' SDPA
(one warning, never an exception); generation (greedy, sampling, beam search, static cache, from
inputs_embeds), logits_to_keep, classification heads and compiled forwards, each compared with SDPA on
tiny random Llama / Qwen2 / Mistral / Qwen3."""
import warnings

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import mmfuse  # noqa: F401  (registers the attention)
from mmfuse.models import hf_integration
from tests.helpers import rel_err

FIELDS = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)


def pair(kind: str = "llama", head=None):
    classes = {"llama": (LlamaConfig, head or LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[kind]
    torch.manual_seed(0)
    extra = {"num_labels": 3} if head is LlamaForSequenceClassification else {}
    extra.update({"mistral": {"sliding_window": 4}, "qwen3": {"head_dim": 16}}.get(kind, {}))  # a window: an interval
    sdpa = model_class(config_class(**FIELDS, **extra, attn_implementation="sdpa")).eval()
    ours = model_class(config_class(**FIELDS, **extra, attn_implementation="mmfuse")).eval()
    ours.load_state_dict(sdpa.state_dict())
    return sdpa, ours


def inputs():
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    left = torch.ones(3, 9, dtype=torch.long)
    left[0, :3] = 0
    holes = left.clone()
    holes[1, 4] = holes[2, 2] = 0  # padding inside rows: not one interval per query
    return ids, left, holes


def fallbacks(fn):
    """Run ``fn`` and return the SDPA-fallback warnings it raised."""
    hf_integration._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "mmfuse attention" in str(w.message)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
def test_padding_holes_fall_back_to_sdpa_with_one_warning_and_the_same_gradients(kind):
    sdpa, ours = pair(kind)
    ids, _, holes = inputs()
    want = sdpa(ids, attention_mask=holes).logits
    got = {}
    warned = fallbacks(lambda: got.setdefault("logits", ours(ids, attention_mask=holes).logits))
    assert len(warned) == 1 and "padding inside a row" in warned[0]  # once, not once per layer
    real = holes.bool()
    assert rel_err(got["logits"][real], want[real]) <= 1e-5
    want[real].square().mean().backward()
    got["logits"][real].square().mean().backward()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rel_err(dict(ours.named_parameters())[name].grad, dict(sdpa.named_parameters())[name].grad) <= 1e-4


def test_custom_4d_masks_bool_and_float_run_natively_and_biases_fall_back():
    sdpa, ours = pair()
    ids, _, _ = inputs()
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    packed = causal.clone()
    packed[5:, :5] = False  # two packed documents: block-causal, still one interval per query
    bool4d = packed[None, None].expand(3, 1, L, L)
    float4d = torch.zeros(3, 1, L, L).masked_fill(~bool4d, float("-inf"))
    minimum = torch.zeros(3, 1, L, L).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    for mask in (bool4d, float4d, minimum):
        got = {}
        assert fallbacks(lambda: got.setdefault("x", ours(ids, attention_mask=mask).logits)) == []  # native
        assert rel_err(got["x"], sdpa(ids, attention_mask=mask).logits) <= 1e-5
    bias = float4d + torch.linspace(-1, 0, L)  # an additive bias (ALiBi-like): not expressible as intervals
    got = {}
    warned = fallbacks(lambda: got.setdefault("x", ours(ids, attention_mask=bias).logits))
    assert len(warned) == 1 and "additive bias" in warned[0]
    assert rel_err(got["x"], sdpa(ids, attention_mask=bias).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "beam_sample", "static", "embeds", "holes"])
def test_generation_matches_sdpa_token_for_token(kind, mode):
    sdpa, ours = pair(kind)
    ids, left, holes = inputs()
    kwargs = dict(attention_mask=holes if mode == "holes" else left, max_new_tokens=5, pad_token_id=0)
    kwargs.update({"greedy": dict(do_sample=False), "holes": dict(do_sample=False),
                   "sample": dict(do_sample=True, top_k=10), "beam": dict(num_beams=3, do_sample=False),
                   "beam_sample": dict(num_beams=2, do_sample=True), "static": dict(do_sample=False,
                   cache_implementation="static"), "embeds": dict(do_sample=False)}[mode])

    def run(model):
        torch.manual_seed(3)  # the same draws for sampling
        if mode == "embeds":
            return model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kwargs)
        return model.generate(ids, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the holes' fallback warning
        assert torch.equal(run(ours), run(sdpa))


def test_logits_to_keep_and_a_classification_head():
    sdpa, ours = pair()
    ids, left, _ = inputs()
    assert rel_err(ours(ids, attention_mask=left, logits_to_keep=2).logits,
                   sdpa(ids, attention_mask=left, logits_to_keep=2).logits) <= 1e-5
    sdpa, ours = pair(head=LlamaForSequenceClassification)
    assert rel_err(ours(ids, attention_mask=left).logits, sdpa(ids, attention_mask=left).logits) <= 1e-5


def test_compiled_full_graph_forward_matches_sdpa():
    sdpa, ours = pair()
    ids, left, _ = inputs()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            got = compiled(ids, attention_mask=left).logits  # a mask under compile: SDPA, in the graph
            plain = compiled(ids).logits  # no mask (causal): mixed_attention, in the graph
    real = left.bool()
    assert rel_err(got[real], sdpa(ids, attention_mask=left).logits[real]) <= 1e-5
    assert rel_err(plain, sdpa(ids).logits) <= 1e-5


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_bidirectional_vision_towers_match_sdpa(tower):
    """SigLIP / CLIP vision models: no mask, not causal -- every patch sees every patch on mixed_attention."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_class, model_class = {"siglip": (SiglipVisionConfig, SiglipVisionModel),
                                 "clip": (CLIPVisionConfig, CLIPVisionModel)}[tower]
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=7)
    torch.manual_seed(0)
    sdpa = model_class(config_class(**fields, attn_implementation="sdpa"))
    ours = model_class(config_class(**fields, attn_implementation="mmfuse"))
    ours.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 28, 28)
    assert fallbacks(lambda: ours(x)) == []
    want, got = sdpa(x).last_hidden_state, ours(x).last_hidden_state
    assert rel_err(got, want) <= 1e-5
    probe = torch.randn_like(want)  # a random projection: the LayerNorm'd states' mean square has ~0 gradient
    (want * probe).sum().backward()
    (got * probe).sum().backward()
    name = next(n for n, _ in ours.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    grads = [dict(m.named_parameters())[name].grad for m in (ours, sdpa)]
    assert rel_err(*grads) <= 1e-4


def test_vlms_with_images_match_sdpa(tmp_path):
    """Qwen2.5-VL (its ViT's windows and whole-image blocks, the M-RoPE LLM) and LLaVA-NeXT (CLIP tower,
    Llama) on attn_implementation="mmfuse", images in the prompt: logits and greedy generation as SDPA."""
    from transformers import LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    from tests.models.test_llava import PICTURES as LLAVA_PICTURES
    from tests.models.test_llava import inputs as llava_inputs
    from tests.models.test_llava import tiny as tiny_llava
    from tests.models.test_llava import tokenizer
    from tests.models.test_qwen_vl import PICTURES, TEXTS, prompts_with_images
    from tests.models.test_qwen_vl import tiny as tiny_qwen

    tiny_qwen(tmp_path / "qwen")
    tok = tokenizer()
    tiny_llava("next", tok).save_pretrained(tmp_path / "next")
    cases = [(Qwen2_5_VLForConditionalGeneration, tmp_path / "qwen", prompts_with_images(PICTURES, TEXTS), 0),
             (LlavaNextForConditionalGeneration, tmp_path / "next",
              llava_inputs("next", tok, None, ["what is this <image>", "<image> a red"], LLAVA_PICTURES[:2]),
              tok.pad_token_id)]
    for model_class, folder, enc, pad in cases:
        sdpa = model_class.from_pretrained(folder, attn_implementation="sdpa").eval()
        ours = model_class.from_pretrained(folder, attn_implementation="mmfuse").eval()
        real = enc["attention_mask"].bool()
        with torch.no_grad():
            got = {}
            assert fallbacks(lambda: got.setdefault("x", ours(**enc).logits)) == [], model_class.__name__
            assert rel_err(got["x"][real], sdpa(**enc).logits[real]) <= 1e-5
            kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad, eos_token_id=None)
            assert torch.equal(ours.generate(**enc, **kwargs), sdpa.generate(**enc, **kwargs)), model_class.__name__
