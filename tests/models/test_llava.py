"""LLaVA-family VLMs whole (tower + projector + LLM) against transformers, images in the prompt, on tiny
random checkpoints (fp32): logits, anyres tiling (unpadding, newlines, OneVision's shrinking), greedy
generation token for token, the towers' hidden states, strict loading."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                          LlavaNextProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig, SiglipVisionModel)

from mmfuse.engine.generate import generate
from mmfuse.models import CheckpointError, from_pretrained
from mmfuse.models.llava import LlavaVLM
from mmfuse.models.loading import language_model
from tests import offline
from tests.helpers import rel_err

PINS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84]]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
             patch_size=7)


def tokenizer():
    tok = offline.tiny_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.padding_side = "left"
    return tok


def text(vocab: int, llama: bool):
    fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)
    return LlamaConfig(**fields, head_dim=32) if llama else Qwen2Config(**fields)


def tiny(kind: str, tok, aspect: str = "anyres_max_9"):
    """A random transformers VLM: "llava" (CLIP, one tile), "next" (CLIP, anyres), "onevision" (SigLIP)."""
    torch.manual_seed(0)
    image = tok.convert_tokens_to_ids("<image>")
    vocab = len(tok) + 4
    if kind == "llava":
        cfg = LlavaConfig(text_config=text(vocab, True), vision_config=CLIPVisionConfig(**TOWER),
                          image_token_index=image)
        return LlavaForConditionalGeneration(cfg).eval()
    if kind == "next":
        cfg = LlavaNextConfig(text_config=text(vocab, True), vision_config=CLIPVisionConfig(**TOWER),
                              image_token_index=image, image_grid_pinpoints=PINS)
        model = LlavaNextForConditionalGeneration(cfg).eval()
    else:
        cfg = LlavaOnevisionConfig(text_config=text(vocab, False), vision_config=SiglipVisionConfig(**TOWER),
                                   image_token_index=image, image_grid_pinpoints=PINS, vision_aspect_ratio=aspect)
        model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()  # transformers starts it at random, but make sure it matters
    return model


PICTURES = [offline.picture("red", "square", size=(40, 22)), offline.picture("blue", "circle", size=(20, 30)),
            offline.picture("green", "square", size=(70, 25))]


def processor_inputs(kind: str, tok, prompts: list[str], pictures: list):
    """What the checkpoint's processor gives: LLaVA-NeXT's own processor; for LLaVA and OneVision (whose
    processor needs torchvision here) the image processor, with the placeholders expanded by hand."""
    if kind == "next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=PINS)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7, num_additional_image_tokens=1,  # CLS
                                  vision_feature_select_strategy="default")
        return dict(proc(images=pictures, text=prompts, return_tensors="pt", padding=True))
    return None


def expand(tok, ours: LlavaVLM, prompts: list[str], pixel_values, image_sizes):
    """Placeholders expanded to the feature count of each image (in prompt order), left-padded."""
    counts = iter(f.shape[0] for f in ours.image_features(pixel_values, image_sizes))
    texts = [p.replace("<image>", "\0") for p in prompts]
    texts = ["".join("<image>" * next(counts) if ch == "\0" else ch for ch in t) for t in texts]
    return dict(tok(texts, return_tensors="pt", padding=True))


def inputs(kind: str, tok, ours, prompts, pictures):
    got = processor_inputs(kind, tok, prompts, pictures)
    if got is not None:
        return got
    if kind == "llava":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        pixels = SiglipImageProcessorPil(size={"height": 28, "width": 28})(images=pictures, return_tensors="pt")
        enc = {"pixel_values": pixels["pixel_values"]}
    else:
        ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINS)
        enc = dict(ip(images=pictures, return_tensors="pt"))
    return {**expand(tok, ours, prompts, enc["pixel_values"], enc.get("image_sizes")), **enc}


CASES = [("llava", "anyres_max_9"), ("next", "anyres_max_9"), ("onevision", "anyres_max_9"),
         ("onevision", "anyres_max_1")]  # max 1 tile: the grid is shrunk bilinearly


@pytest.mark.parametrize("kind,aspect", CASES)
def test_logits_match_transformers_with_images_in_the_prompt(tmp_path, kind, aspect):
    tok = tokenizer()
    hf = tiny(kind, tok, aspect)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, LlavaVLM)
    prompts = ["what is this <image>", "<image> a blue circle and", "<image> draw me"]
    enc = inputs(kind, tok, ours, prompts, PICTURES)
    assert (enc["attention_mask"] == 0).any()  # rows of different lengths: left padding
    with torch.no_grad():
        want = hf(**enc).logits
        got = ours(enc["input_ids"], enc["pixel_values"], enc.get("image_sizes"), enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert rel_err(got[real], want[real]) <= 1e-4
    # the pictures are read: another picture, other logits
    with torch.no_grad():
        other = ours(enc["input_ids"], enc["pixel_values"].flip(-1), enc.get("image_sizes"), enc["attention_mask"])
    assert rel_err(other[real], got[real]) > 1e-3


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_greedy_generation_with_images_matches_transformers_token_for_token(tmp_path, kind):
    tok = tokenizer()
    hf = tiny(kind, tok)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    enc = inputs(kind, tok, ours, ["what is this <image>", "<image> a red"], PICTURES[:2])
    want = hf.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        layout = ours.layout(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc.get("image_sizes"))
    got = generate(ours.decoder, None, 8, layout=layout)
    assert torch.equal(got[:, enc["input_ids"].shape[1]:], want[:, enc["input_ids"].shape[1]:])


@pytest.mark.parametrize("tower", [CLIPVisionModel, SiglipVisionModel])
def test_vision_towers_hidden_states_match_transformers(tmp_path, tower):
    config = (CLIPVisionConfig if tower is CLIPVisionModel else SiglipVisionConfig)(**TOWER)
    torch.manual_seed(0)
    hf = tower(config).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        for layer in (0, 1, -2, -1):
            assert rel_err(ours.features(x, layer), out.hidden_states[layer]) <= 1e-5
        assert rel_err(ours(x), out.last_hidden_state) <= 1e-5


def test_the_language_model_alone_and_strict_loading(tmp_path):
    tok = tokenizer()
    hf = tiny("next", tok)
    hf.save_pretrained(tmp_path)
    decoder = language_model(tmp_path)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert rel_err(decoder.logits(decoder(ids)), hf(input_ids=ids).logits) <= 1e-4
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    newline = next(k for k in tensors if k.endswith("image_newline"))
    save_file({**tensors, "multi_modal_projector.extra": torch.zeros(1)}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="multi_modal_projector.extra"):
        from_pretrained(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != newline}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="image_newline"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("top", [None, True, False])
def test_the_lm_head_is_tied_as_transformers_ties_it(tmp_path, top):
    """transformers 5 ties a VLM's LM head by the top-level tie_word_embeddings alone (default False),
    whatever its text_config says."""
    tok = tokenizer()
    vocab = len(tok) + 4
    config = LlavaNextConfig(text_config=LlamaConfig(**{**text(vocab, True).to_dict(), "tie_word_embeddings": True}),
                             vision_config=CLIPVisionConfig(**TOWER), image_grid_pinpoints=PINS,
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             **({} if top is None else {"tie_word_embeddings": top}))
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert rel_err(language_model(tmp_path).logits(language_model(tmp_path)(ids)), hf(input_ids=ids).logits) <= 1e-4


def test_a_placeholder_count_that_disagrees_with_the_images_is_refused(tmp_path):
    tok = tokenizer()
    tiny("onevision", tok).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    enc = inputs("onevision", tok, ours, ["what is this <image>"], PICTURES[:1])
    short = enc["input_ids"][:, :-1]  # one image token fewer than the picture gives features
    with pytest.raises(ValueError, match="<image> tokens but the images give"):
        ours(short, enc["pixel_values"], enc["image_sizes"])
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(enc["input_ids"])


CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def next_folder(path, tok):
    """A LLaVA-NeXT model folder as the hub has them: weights, config, processor with a chat template."""
    hf = tiny("next", tok)
    hf.save_pretrained(path)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=PINS)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7, num_additional_image_tokens=1,
                       vision_feature_select_strategy="default", chat_template=CHAT).save_pretrained(path)
    return hf


def test_a_vlm_folder_answers_about_a_png_through_its_processor_and_chat_template(tmp_path, capsys):
    from transformers import AutoProcessor

    from mmfuse.cli import main
    from mmfuse.engine.pipeline import MMFusePipeline

    tok = tokenizer()
    hf = next_folder(tmp_path / "vlm", tok)
    png = tmp_path / "red.png"
    PICTURES[0].save(png)
    pipe = MMFusePipeline.from_pretrained(tmp_path / "vlm")
    got = pipe.generate_text(["what is this <image>", "a red"], images=[[str(png)], []], max_new_tokens=6)
    # transformers: the same chat turns through the same processor, then generate
    proc = AutoProcessor.from_pretrained(tmp_path / "vlm")
    proc.tokenizer.padding_side = "left"
    turns = [[{"type": "text", "text": "what is this"}, {"type": "image"}], [{"type": "text", "text": "a red"}]]
    texts = [proc.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in turns]
    from PIL import Image

    enc = proc(images=[Image.open(png)], text=texts, return_tensors="pt", padding=True)
    out = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    want = [tok.decode(r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r, skip_special_tokens=True)
            for r in new]
    assert got == want
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "vlm"), "--image", str(png), "--prompt", "what is this",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == pipe.generate_text("what is this", images=str(png),
                                                                      max_new_tokens=6)[0]
    with pytest.raises(ValueError, match="prompt 0 has 1 <image> placeholder"):
        pipe.generate_text("what is <image>", images=[str(png), str(png)])


def test_a_vlm_folder_without_its_processor_is_named_before_weights_load(tmp_path, monkeypatch):
    from mmfuse.engine.pipeline import MMFusePipeline
    from mmfuse.models import loading

    tok = tokenizer()
    tiny("next", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)  # a tokenizer, but no processor_config.json / image processor
    monkeypatch.setattr(loading, "load_llava", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(CheckpointError, match="AutoProcessor cannot load"):
        MMFusePipeline.from_pretrained(tmp_path)
