"""The language model of a VLM checkpoint (LLaVA, LLaVA-OneVision): the base of LlavaFusion and MetaQuery
(the whole VLM, images in the prompt, is tests/models/test_llava.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

from mmfuse.kernels import mask_intervals
from mmfuse.models import CheckpointError, Decoder, from_pretrained
from mmfuse.models.fusion import LlamaFusion
from mmfuse.models.loading import language_model
from tests.helpers import rel_err
from tests.models.test_fusion import FUSION

VISION = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=7)
TEXT = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


def tiny_vlm(kind: str):
    if kind == "llava-qwen2":
        return LlavaForConditionalGeneration(LlavaConfig(text_config=Qwen2Config(**TEXT), vision_config=VISION,
                                                         image_token_index=119)).eval()
    if kind == "llava-llama":
        return LlavaForConditionalGeneration(LlavaConfig(text_config=LlamaConfig(**TEXT, head_dim=32),
                                                         vision_config=VISION, image_token_index=119)).eval()
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        text_config=Qwen2Config(**TEXT), vision_config=VISION, image_token_index=119)).eval()


@pytest.mark.parametrize("kind", ["llava-qwen2", "llava-llama", "onevision"])
def test_language_model_logits_match_the_vlm_on_text(kind, tmp_path):
    vlm = tiny_vlm(kind)
    vlm.save_pretrained(tmp_path)
    ours = language_model(tmp_path)
    assert isinstance(ours, Decoder)
    ids = torch.randint(0, 110, (2, 17))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(ids)), vlm(input_ids=ids).logits) <= 1e-4


def test_llavafusion_from_a_vlm_keeps_text_logits(tmp_path):
    tiny_vlm("llava-qwen2").save_pretrained(tmp_path)
    base = language_model(tmp_path)
    fusion = LlamaFusion.from_decoder(base, FUSION)
    ids = torch.randint(0, 110, (1, 11))
    with torch.no_grad():
        hidden, _ = fusion(ids, torch.zeros_like(ids), torch.zeros(0, 4, 8, 8), torch.zeros(0, dtype=torch.long),
                           *mask_intervals(torch.zeros_like(ids)))
        assert torch.equal(fusion.decoder.logits(hidden), base.logits(base(ids)))


def test_vlm_without_language_model_tensors_is_reported(tmp_path):
    tiny_vlm("llava-qwen2").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("language_model.")}, file,
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no language-model tensors"):
        from_pretrained(tmp_path)


def test_vlm_with_a_missing_layer_tensor_names_it(tmp_path):
    tiny_vlm("llava-qwen2").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight"):
        from_pretrained(tmp_path)


def test_vlm_config_without_text_config(tmp_path):
    tiny_vlm("llava-qwen2").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="text_config"):
        from_pretrained(tmp_path)
