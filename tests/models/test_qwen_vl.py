"""Qwen2.5-VL whole against transformers on tiny random checkpoints (fp32), images in the prompt: the ViT
(windowed + full attention as intervals, 2D RoPE, merger), multimodal RoPE positions, logits, greedy
generation token for token, strict loading."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from mmfuse.engine.generate import generate
from mmfuse.models import CheckpointError, from_pretrained
from mmfuse.models.loading import language_model
from mmfuse.models.qwen_vl import Qwen25VL
from tests import offline
from tests.helpers import rel_err

IMAGE, VIDEO, START, END = 300, 301, 302, 303


def tiny(tmp_path, full=(1,)):
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=list(full)),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


def prompts_with_images(pictures, texts):
    """What Qwen2.5-VL's processor gives: patches, grids and the placeholders expanded (by hand: its
    processor needs torchvision here), left-padded."""
    enc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                                   max_pixels=48 * 48)(images=pictures, return_tensors="pt")
    counts = iter((enc["image_grid_thw"].prod(dim=1) // 4).tolist())
    rows = []
    for parts in texts:
        ids = []
        for part in parts:
            ids += [START] + [IMAGE] * next(counts) + [END] if part == "<image>" else list(part)
        rows.append(ids)
    L = max(map(len, rows))
    input_ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=(input_ids == IMAGE).int())


PICTURES = [offline.picture("red", "square", size=(40, 24)), offline.picture("blue", "circle", size=(24, 44)),
            offline.picture("green", "square", size=(64, 20))]
TEXTS = [[[5, 6, 7], "<image>", [8, 9]], ["<image>", [10], "<image>", [11, 12, 13, 14, 15, 16]]]


@pytest.mark.parametrize("full", [(1,), (0, 1, 2), ()])  # some blocks windowed, all whole, all windowed
def test_logits_match_transformers_with_images_in_the_prompt(tmp_path, full):
    hf = tiny(tmp_path, full)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, Qwen25VL)
    enc = prompts_with_images(PICTURES, TEXTS)
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        want = hf(**enc).logits
        got = ours(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"])
        feats = hf.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
        assert rel_err(ours.vision(enc["pixel_values"], enc["image_grid_thw"]), torch.cat(list(feats))) <= 1e-5
    real = enc["attention_mask"].bool()
    assert rel_err(got[real], want[real]) <= 1e-4
    ref_positions, _ = hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                               attention_mask=enc["attention_mask"])
    layout = ours.layout(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_grid_thw"])
    assert torch.equal(layout.position_ids[:, real], ref_positions[:, real])


def test_greedy_generation_with_images_matches_transformers_token_for_token(tmp_path):
    hf = tiny(tmp_path)
    ours = from_pretrained(tmp_path)
    enc = prompts_with_images(PICTURES, TEXTS)
    want = hf.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        layout = ours.layout(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_grid_thw"])
    got = generate(ours.decoder, None, 8, layout=layout)
    P = enc["input_ids"].shape[1]
    assert torch.equal(got[:, P:], want[:, P:])


def test_the_language_model_alone_and_strict_loading(tmp_path):
    hf = tiny(tmp_path)
    decoder = language_model(tmp_path)
    ids = torch.randint(0, 299, (1, 9))
    with torch.no_grad():
        assert rel_err(decoder.logits(decoder(ids)), hf(input_ids=ids).logits) <= 1e-4
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    gone = next(k for k in tensors if k.endswith("blocks.2.mlp.up_proj.weight"))
    save_file({k: v for k, v in tensors.items() if k != gone}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="blocks.2.mlp.up_proj.weight"):
        from_pretrained(tmp_path)


def test_bad_image_inputs_are_named(tmp_path):
    tiny(tmp_path)
    ours = from_pretrained(tmp_path)
    enc = prompts_with_images(PICTURES, TEXTS)
    fewer = enc["input_ids"].clone()
    fewer[0, (fewer[0] == IMAGE).nonzero()[0]] = 5  # one image token short of what the picture gives
    with pytest.raises(ValueError, match="image tokens but the images give"):
        ours(fewer, enc["pixel_values"], enc["image_grid_thw"])
    with pytest.raises(ValueError, match="image_grid_thw must be"):
        ours(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"][:2])
    with pytest.raises(ValueError, match="videos are not supported"):
        ours(torch.tensor([[5, VIDEO, 6]]))
