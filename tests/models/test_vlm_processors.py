"""LLaVA-OneVision and Qwen2.5-VL folders through their own transformers processors (AutoProcessor),
in the pipeline and ``mmfuse generate --image``: answers equal transformers' ``generate`` on the same
processor output. transformers 5 builds these two processors only with torchvision installed (their
video processors need it), so these tests run where it is; LLaVA-NeXT's is tested in test_llava.py."""
import pytest
import torch
from tokenizers import AddedToken

pytest.importorskip("torchvision")

from mmfuse.cli import main  # noqa: E402
from mmfuse.engine.pipeline import MMFusePipeline  # noqa: E402
from tests import offline  # noqa: E402
from tests.models import test_llava, test_qwen_vl  # noqa: E402

CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMAGE }}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def onevision_folder(path):
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    tok = test_llava.tokenizer()
    hf = test_llava.tiny("onevision", tok)
    hf.save_pretrained(path)
    ip = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=test_llava.PINS)
    LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(),
                            num_image_tokens=16, vision_feature_select_strategy="full",
                            chat_template=CHAT.replace("{{ IMAGE }}", "<image>")).save_pretrained(path)
    return hf, tok


def qwen_folder(path):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = offline.tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in
                    ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")], special_tokens=True)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == test_qwen_vl.IMAGE
    tok.padding_side = "left"
    hf = test_qwen_vl.tiny(path)
    ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=48 * 48)
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=CHAT.replace("{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>")
                        ).save_pretrained(path)
    return hf, tok


@pytest.mark.parametrize("make", [onevision_folder, qwen_folder], ids=["onevision", "qwen2_5_vl"])
def test_the_vlm_answers_about_a_png_through_its_own_processor(tmp_path, make, capsys):
    from PIL import Image
    from transformers import AutoProcessor

    hf, tok = make(tmp_path / "vlm")
    png = tmp_path / "red.png"
    test_llava.PICTURES[0].save(png)
    pipe = MMFusePipeline.from_pretrained(tmp_path / "vlm")
    got = pipe.generate_text("what is this", images=str(png), max_new_tokens=6)
    proc = AutoProcessor.from_pretrained(tmp_path / "vlm")
    turn = [{"type": "image"}, {"type": "text", "text": "what is this"}]
    text = proc.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False)
    enc = proc(images=[Image.open(png)], text=[text], return_tensors="pt")
    out = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
    row = out[0, enc["input_ids"].shape[1]:].tolist()
    want = tok.decode(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row, skip_special_tokens=True)
    assert got == [want]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "vlm"), "--image", str(png), "--prompt", "what is this",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want
    assert torch.is_tensor(enc["pixel_values"])
