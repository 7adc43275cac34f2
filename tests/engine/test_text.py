"""Tokenizers: the family's special tokens added for real, the embeddings grown to fit, prompts composed
the way training documents are."""
import json

import pytest
import torch

from mmfuse.cli import main
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.engine.text import add_family_tokens, fit_vocabulary, load_tokenizer, prompt_ids
from mmfuse.models import from_pretrained
from mmfuse.models.family import get_family
from mmfuse.models.fusion import FusionConfig
from mmfuse.models.hf_io import CheckpointError
from tests import offline
from tests.models.test_decoder import tiny_llama


def test_boi_and_eoi_become_special_tokens_and_the_embeddings_grow(tmp_path):
    tok = offline.tiny_tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    tiny_llama(vocab_size=n).save_pretrained(tmp_path)  # no room for new tokens: the model must grow
    decoder = from_pretrained(tmp_path)
    old = decoder.embed.weight.detach().clone()
    config = add_family_tokens(tok, get_family("fusion"), FusionConfig())
    assert (config.boi_token_id, config.eoi_token_id) == (n, n + 1) and len(tok) == n + 2
    assert tok.convert_ids_to_tokens([n, n + 1]) == ["<boi>", "<eoi>"]
    assert tok("a <boi> b", add_special_tokens=False)["input_ids"].count(n) == 1  # one token, never split
    assert tok.decode([n, n + 1], skip_special_tokens=True) == ""
    fit_vocabulary(decoder, tok)
    assert decoder.config.vocab_size == n + 2 and decoder.embed.weight.shape == (n + 2, old.shape[1])
    assert torch.equal(decoder.embed.weight[:n], old)
    torch.testing.assert_close(decoder.embed.weight[n], old.mean(0))  # new rows start at the mean
    again = add_family_tokens(tok, get_family("fusion"), FusionConfig())  # already there: nothing added
    assert (again.boi_token_id, len(tok)) == (n, n + 2)
    with pytest.raises(CheckpointError, match="boi_token_id=5 but the tokenizer gives '<boi>' the id"):
        add_family_tokens(tok, get_family("fusion"), FusionConfig(boi_token_id=5), explicit={"boi_token_id"})


def test_a_trained_model_folder_carries_its_extended_tokenizer(tmp_path):
    tok = offline.tiny_tokenizer()
    offline.llama_base(tmp_path / "llm", tok)
    offline.kl_vae(tmp_path / "vae")
    offline.captioned_pictures(tmp_path)
    config = offline.write_config(tmp_path, family="fusion", base="llm", vae="vae",
                                  fusion={"latent_channels": 4, "latent_size": 4, "patch_size": 2, "timestep_dim": 32},
                                  data={"path": "captions.jsonl", "row_len": 32, "rows_per_batch": 2, "num_workers": 0},
                                  train={"steps": 1, "warmup_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    saved = load_tokenizer(tmp_path / "run" / "model")
    model_cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["fusion"]
    assert saved.convert_tokens_to_ids("<boi>") == model_cfg["boi_token_id"] == len(tok)
    assert len(saved) == len(tok) + 2 and not (tmp_path / "llm" / "tokenizer" ).exists()  # the base is untouched
    assert len(load_tokenizer(tmp_path / "llm")) == len(tok)


def test_a_prompt_is_composed_like_a_training_document():
    tok = offline.tiny_tokenizer()
    ids = prompt_ids(tok, "a red square")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "a red square"
    assert prompt_ids(tok, "") == []  # the unconditional prompt: what caption dropout leaves


def test_a_fusion_prompt_asks_for_an_image_with_boi(tmp_path):
    offline.llama_base(tmp_path / "llm")
    tok = load_tokenizer(tmp_path / "llm")
    fusion = get_family("fusion")
    config = add_family_tokens(tok, fusion, FusionConfig(latent_channels=4, latent_size=4))
    from mmfuse.models.family import Parts

    model = fusion.build(Parts(from_pretrained(tmp_path / "llm")), config)
    pipe = MMFusePipeline(model, tok)
    seen = []
    real = fusion.pipeline.condition

    def spy(model, prompts, negatives, recompute=False):
        seen.append(([p.tolist() for p in prompts], [n.tolist() for n in negatives]))
        return real(model, prompts, negatives, recompute)

    object.__setattr__(fusion.pipeline, "condition", spy)
    try:
        pipe("a red square", num_inference_steps=1, guidance_scale=2.0, output_type="latent")
    finally:
        object.__setattr__(fusion.pipeline, "condition", real)
    (prompts, negatives), = seen
    assert prompts == [prompt_ids(tok, "a red square") + [config.boi_token_id]]
    assert negatives == [[config.boi_token_id]]  # the empty prompt, then BOI
