"""LlavaFusion: LlamaFusion built on a whole VLM (tiny random LLaVA-NeXT / Qwen2.5-VL, fp32, no download).

The VLM's tower and projector become the frozen reader and its language model the frozen text
expert, so understanding stays the VLM's own: logits and greedy answers about pictures equal
transformers' VLM; the image expert trains for generation from the VLM folder with ``mmfuse train``.
"""
import pytest
import torch
from safetensors.torch import load_file

from mmfuse.cli import main
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models import CheckpointError, to_fusion
from mmfuse.models.fusion import FusionConfig, LlamaFusion
from mmfuse.models.vlm import read_prompt
from tests import offline
from tests.helpers import rel_err
from tests.models import test_llava, test_qwen_vl

FUSION = dict(latent_channels=4, latent_size=8, patch_size=2, boi_token_id=3, eoi_token_id=4)


def fusion_logits(model: LlamaFusion, enc: dict) -> torch.Tensor:
    layout = read_prompt(model.reader, model.decoder.embed, enc)
    hidden = model.decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids,
                           kv_start=layout.kv_start, kv_end=layout.kv_end, modality=layout.modality)
    return model.decoder.logits(hidden)


def test_to_fusion_of_llava_next_reads_pictures_as_the_vlm_does():
    tok = test_llava.tokenizer()
    hf = test_llava.tiny("next", tok)
    enc = test_llava.processor_inputs("next", tok, ["what is this <image>", "<image> a blue circle and"],
                                      test_llava.PICTURES[:2])
    model = to_fusion(hf, FusionConfig(**FUSION)).eval()
    with torch.no_grad():
        want, got = hf(**enc).logits, fusion_logits(model, enc)
    real = enc["attention_mask"].bool()
    assert rel_err(got[real], want[real]) <= 1e-4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("reader.") or n.endswith(".weights.0") for n in trainable)
    assert any(n.endswith(".weights.1") for n in trainable) and "patch_in.weight" in trainable
    # the VLM is left as it was: nothing of the fusion model aliases its weights
    hf_ptrs = {p.data_ptr() for p in hf.parameters()}
    assert not any(p.data_ptr() in hf_ptrs for p in model.parameters())


@pytest.mark.parametrize("full", [(1,)])
def test_to_fusion_of_qwen2_5_vl_keeps_its_3d_positions(tmp_path, full):
    hf = test_qwen_vl.tiny(tmp_path, full)
    enc = test_qwen_vl.prompts_with_images(test_qwen_vl.PICTURES, test_qwen_vl.TEXTS)
    model = to_fusion(hf, FusionConfig(**FUSION)).eval()
    with torch.no_grad():
        want, got = hf(**enc).logits, fusion_logits(model, enc)
    real = enc["attention_mask"].bool()
    assert rel_err(got[real], want[real]) <= 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LLaVA-NeXT folder (weights, processor, chat template), and LlavaFusion trained on it by ``mmfuse train``."""
    root = tmp_path_factory.mktemp("llavafusion")
    tok = test_llava.tokenizer()
    hf = test_llava.next_folder(root / "vlm", tok)
    offline.kl_vae(root / "vae")
    offline.captioned_pictures(root)
    config = offline.write_config(root, family="fusion", base="vlm", vae="vae",
                                  fusion={"latent_channels": 4, "latent_size": 4, "patch_size": 2, "timestep_dim": 32},
                                  data={"path": "captions.jsonl", "row_len": 32, "rows_per_batch": 2, "num_workers": 0},
                                  train={"steps": 2, "lr": 1e-2, "warmup_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    png = root / "red.png"
    test_llava.PICTURES[0].save(png)
    return {"root": root, "hf": hf, "tok": tok, "model": root / "run" / "model", "png": png}


def test_the_trained_folder_keeps_the_vlm_reader_and_its_processor(trained):
    folder, hf = trained["model"], trained["hf"]
    assert (folder / "processor" / "processor_config.json").is_file()
    saved = load_file(str(folder / "model.safetensors"))
    # the tower and the text path are the VLM's, untouched by training; the image expert moved
    tower = next(v for k, v in hf.model.vision_tower.state_dict().items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(saved["reader.vision.layers.0.attn.qkv.weight"][:tower.shape[0]], tower)
    assert torch.equal(saved["reader.projector.0.weight"], hf.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(saved["reader.image_newline"], hf.model.image_newline)
    q = [k for k in saved if k.startswith("decoder.layers.0.attn.") and k.endswith(".weights.0")]
    assert q and all(not torch.equal(saved[k], saved[k[:-1] + "1"]) for k in q)


def test_llava_fusion_answers_about_a_png_as_the_vlm_does(trained, capsys):
    hf, tok, png = trained["hf"], trained["tok"], trained["png"]
    pipe = MMFusePipeline.from_pretrained(trained["model"])
    assert isinstance(pipe.model, LlamaFusion) and pipe.model.reader is not None
    got = pipe.generate_text("what is this", images=str(png), max_new_tokens=6)
    # transformers: the same user turn through the VLM's own processor and chat template
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(trained["root"] / "vlm")
    turn = [{"type": "image"}, {"type": "text", "text": "what is this"}]  # no placeholder: the image goes first
    text = proc.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False)
    enc = proc(images=[Image.open(png)], text=[text], return_tensors="pt")
    # LlavaFusion stops where it would start drawing (BOI, an id the VLM's vocabulary has spare)
    stops = [tok.eos_token_id, pipe.model.config.boi_token_id]
    out = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stops)
    row = out[0, enc["input_ids"].shape[1]:].tolist()
    want = tok.decode(row[:min([row.index(t) for t in stops if t in row] or [len(row)])], skip_special_tokens=True)
    assert want and got == [want]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(trained["model"]), "--image", str(png), "--prompt", "what is this",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want


def test_llava_fusion_draws_with_its_image_expert(trained, tmp_path):
    pipe = MMFusePipeline.from_pretrained(trained["model"])
    out = pipe("a red square", num_inference_steps=2, seed=0, output_type="pt")
    assert out.images.shape == (1, 3, 8, 8) and torch.isfinite(out.images).all()
    # the same pipeline saved again and reloaded keeps the reader and the processor
    pipe.save_pretrained(tmp_path / "again")
    again = MMFusePipeline.from_pretrained(tmp_path / "again")
    assert again.generate_text("what is this", images=str(trained["png"]), max_new_tokens=4) == \
        pipe.generate_text("what is this", images=str(trained["png"]), max_new_tokens=4)


def test_a_broken_reader_config_is_named(trained, tmp_path):
    import json
    import shutil

    shutil.copytree(trained["model"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["reader"]["kind"] = "nope"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="reader.kind='nope'"):
        MMFusePipeline.from_pretrained(tmp_path / "m")
