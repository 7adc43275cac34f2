"""Gemma 2 and Gemma 3 on mmfuse: attn_implementation="mmfuse" (attention-logit soft-capping in the kernel,
sliding-window layers from their masks) against transformers' eager attention, and mmfuse.patch, whose
report names what it keeps (Gemma's (1 + weight) norms, its GeGLU MLP, Gemma 2's final logit cap)."""
import copy
import warnings

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import mmfuse
from mmfuse.models import hf_integration
from tests.helpers import rel_err

FIELDS = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, query_pre_attn_scalar=16, sliding_window=4)
# A low cap bends tiny random models' scores (the default 50 would leave them untouched).
KINDS = {"gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(attn_logit_softcapping=1.0, final_logit_softcapping=5.0)),
         "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(layer_types=["sliding_attention", "full_attention"] * 2))}


def pair(kind: str, attn: str = "mmfuse"):
    config_class, model_class, extra = KINDS[kind]
    torch.manual_seed(0)
    eager = model_class(config_class(**FIELDS, **extra, attn_implementation="eager")).eval()
    ours = model_class(config_class(**FIELDS, **extra, attn_implementation=attn)).eval()
    ours.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for module in eager.modules():  # random non-trivial norm weights: Gemma's start at 0, i.e. (1 + 0)
            if "RMSNorm" in type(module).__name__:
                torch.nn.init.normal_(module.weight, std=0.3)
        for layer in eager.model.layers:  # scores large enough for the cap to bend them
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def inputs():
    ids = torch.randint(1, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


def no_fallback(fn):
    hf_integration._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in caught if "mmfuse attention" in str(w.message)]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_attention_matches_eager_logits_and_gradients(kind):
    eager, ours = pair(kind)
    ids, mask = inputs()
    eager.train(), ours.train()
    want = eager(ids, attention_mask=mask).logits
    got = no_fallback(lambda: ours(ids, attention_mask=mask).logits)
    real = mask.bool()
    assert rel_err(got[real], want[real]) <= 1e-5
    want[real].square().mean().backward()
    got[real].square().mean().backward()
    theirs = dict(eager.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None or theirs[name].grad is not None:
            assert rel_err(p.grad, theirs[name].grad) <= 1e-4, name


@pytest.mark.parametrize("kind", KINDS)
def test_the_cap_and_the_window_matter_here(kind):
    """Guards the test above: with the window widened or the cap dropped the logits change."""
    eager, _ = pair(kind)
    ids, mask = inputs()
    want = eager(ids, attention_mask=mask).logits
    config_class, model_class, extra = KINDS[kind]
    changes = [dict(sliding_window=64)] + ([dict(attn_logit_softcapping=None)] if kind == "gemma2" else [])
    for change in changes:
        other = model_class(config_class(**{**FIELDS, **extra, **change}, attn_implementation="eager")).eval()
        other.load_state_dict(eager.state_dict())
        assert rel_err(other(ids, attention_mask=mask).logits, want) > 1e-3, change


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["greedy", "beam", "static"])
def test_generation_matches_eager_token_for_token(kind, mode):
    eager, ours = pair(kind)
    ids, mask = inputs()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False,
                  **{"greedy": {}, "beam": dict(num_beams=2), "static": dict(cache_implementation="static")}[mode])
    assert torch.equal(no_fallback(lambda: ours.generate(ids, **kwargs)), eager.generate(ids, **kwargs))


def test_each_layer_types_mask_becomes_intervals_once_per_forward(monkeypatch):
    """Sliding and full layers alternate, each type with its own mask: two conversions, not one per layer."""
    from tests.helpers import count_calls

    _, ours = pair("gemma3")
    ids, mask = inputs()
    calls = count_calls(monkeypatch, {"convert": ("mmfuse.models.hf_integration", "mask_to_intervals")})
    with torch.no_grad():
        ours(ids, attention_mask=mask)
    assert calls["convert"] == 2 < ours.config.num_hidden_layers


def test_soft_capped_masks_that_are_not_intervals_are_computed_densely():
    eager, ours = pair("gemma2")
    ids, mask = inputs()
    mask[1, 5] = 0  # padding inside a row
    hf_integration._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(ids, attention_mask=mask).logits
    assert any("soft-capped attention densely" in str(w.message) for w in caught)
    real = mask.bool()
    assert rel_err(got[real], eager(ids, attention_mask=mask).logits[real]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# mmfuse.patch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "mmfuse"])
def test_patch_reports_what_it_keeps_and_matches_the_unpatched_model(kind, attn):
    ref, with_mmfuse_attention = pair(kind)
    ours = copy.deepcopy(ref if attn == "eager" else with_mmfuse_attention)
    report = mmfuse.patch(ours)
    losses = 0 if kind == "gemma2" else 1
    assert report.counts == {"rms_norm": 0, "mlp": 0, "rope": 4, "loss": losses}
    assert "(1 + weight)" in report.kept["rms_norm"] and "gelu_pytorch_tanh" in report.kept["mlp"]
    if kind == "gemma2":
        assert "final_logit_softcapping" in report.kept["loss"]
    assert "kept:" in str(report)
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # predicted from a padding position, whose output is arbitrary
    ref.train(), ours.train()
    want, got = ref(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    assert rel_err(got.loss, want.loss) <= 1e-5
    want.loss.backward()
    got.loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, theirs[name].grad) <= 1e-4, name
    ref.eval(), ours.eval()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    mmfuse.unpatch(ours)
    assert all("forward" not in m.__dict__ for m in ours.modules())
