"""MetaQuery on a VLM base (tiny random LLaVA-OneVision, fp32, no download): the MLLM reads source
pictures through its own tower -- instruction tuning in ``mmfuse train`` (source images + an
instruction -> one target image) and editing in the pipeline."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaOnevisionImageProcessorPil

from mmfuse.cli import main
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models import from_pretrained
from mmfuse.models.metaquery import MetaQuery
from mmfuse.models.vlm import layout_pieces
from tests import offline
from tests.helpers import rel_err
from tests.models import test_llava
from tests.models.test_metaquery import COND

METAQUERY = {"num_queries": 3, "connector_layers": 1, "connector_dim": 32, "connector_heads": 2,
             "connector_hidden_dim": 48, "cond_dim": COND}


def image_processor():
    return LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=test_llava.PINS)


def onevision_folder(path, tok):
    """A LLaVA-OneVision folder: weights, tokenizer and image processor (its full processor needs torchvision)."""
    hf = test_llava.tiny("onevision", tok)
    hf.save_pretrained(path)
    tok.save_pretrained(str(path))
    image_processor().save_pretrained(str(path))
    return hf


def picture_input(picture) -> dict:
    return {k: v for k, v in image_processor()(images=[picture], return_tensors="pt").items()
            if isinstance(v, torch.Tensor)}


def test_the_reader_lays_out_pictures_as_transformers_reads_them(tmp_path):
    tok = test_llava.tokenizer()
    hf = onevision_folder(tmp_path, tok)
    vlm = from_pretrained(tmp_path)
    pics = test_llava.PICTURES
    rows = [[torch.tensor([5, 6, 7]), picture_input(pics[0]), torch.tensor([8, 9])],
            [picture_input(pics[1]), torch.tensor([10]), picture_input(pics[2]), torch.tensor([11, 12])], []]
    layout = layout_pieces(vlm.reader(), vlm.decoder.embed, rows, "cpu")
    with torch.no_grad():
        hidden = vlm.decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids,
                             kv_start=layout.kv_start, kv_end=layout.kv_end)
        got = vlm.decoder.logits(hidden)
        # transformers on the same expanded ids (it checks the image-token count against its own features)
        enc = image_processor()(images=pics, return_tensors="pt")
        want = hf(input_ids=layout.input_ids[:2], attention_mask=layout.attention_mask[:2],
                  pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).logits
    real = layout.attention_mask[:2].bool()
    assert rel_err(got[:2][real], want[real]) <= 1e-4
    assert layout.attention_mask[2].sum() == 0  # an empty prompt: all padding (the unconditional row)


def test_the_reader_lays_out_qwen2_5_vl_pictures_with_3d_positions(tmp_path):
    from tests.models import test_qwen_vl as qwen

    hf = qwen.tiny(tmp_path)
    vlm = from_pretrained(tmp_path)
    process = qwen.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                                            max_pixels=48 * 48)
    pics = qwen.PICTURES
    one = [{k: v for k, v in process(images=[p], return_tensors="pt").items()} for p in pics]
    rows = [[torch.tensor([5, 6, 7]), one[0], torch.tensor([8, 9])], [one[1], torch.tensor([10]), one[2]]]
    layout = layout_pieces(vlm.reader(), vlm.decoder.embed, rows, "cpu")
    enc = process(images=pics, return_tensors="pt")
    with torch.no_grad():
        hidden = vlm.decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids,
                             kv_start=layout.kv_start, kv_end=layout.kv_end)
        got = vlm.decoder.logits(hidden)
        want = hf(input_ids=layout.input_ids, attention_mask=layout.attention_mask, pixel_values=enc["pixel_values"],
                  image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=(layout.input_ids == qwen.IMAGE).int()).logits
    real = layout.attention_mask.bool()
    assert rel_err(got[real], want[real]) <= 1e-4
    assert (layout.input_ids == qwen.START).sum() == 3 and (layout.input_ids == qwen.END).sum() == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MetaQuery instruction-tuned on the OneVision folder: caption pairs and edit triples mixed."""
    root = tmp_path_factory.mktemp("mq_vlm")
    tok = test_llava.tokenizer()
    hf = onevision_folder(root / "vlm", tok)
    offline.sana(root / "sana")
    offline.dc_vae(root / "vae")
    offline.captioned_pictures(root)
    sources = [[{"image": f"img/{i}.png", "diffuse": False}] + [{"image": f"img/{i + 4}.png", "diffuse": False}] * (i % 2)
               for i in range(4)]  # one source picture, or two (subject-driven: several sources -> one target)
    edits = [{"segments": [*src, {"text": "the same in another color"}, {"image": f"img/{(i + 2) % 8}.png"}]}
             for i, src in enumerate(sources)]
    captions = (root / "captions.jsonl").read_text().splitlines()
    (root / "mixed.jsonl").write_text("\n".join(captions[:4] + [json.dumps(e) for e in edits]) + "\n")
    config = offline.write_config(root, family="metaquery", base="vlm", diffusion="sana", vae="vae", metaquery=METAQUERY,
                                  data={"path": "mixed.jsonl", "row_len": 48, "rows_per_batch": 4, "num_workers": 0},
                                  train={"steps": 2, "lr": 1e-2, "warmup_steps": 1})
    assert main(["train", "--config", str(config)]) == 0
    return {"root": root, "hf": hf, "model": root / "run" / "model"}


def test_instruction_tuning_trains_the_queries_and_keeps_the_mllm(trained):
    saved = load_file(str(trained["model"] / "model.safetensors"))
    hf = trained["hf"]
    assert torch.equal(saved["reader.projector.0.weight"], hf.model.multi_modal_projector.linear_1.weight)
    assert torch.equal(saved["reader.image_newline"], hf.model.image_newline)
    assert torch.equal(saved["llm.embed.weight"], hf.model.language_model.embed_tokens.weight)
    log = [json.loads(line) for line in (trained["root"] / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    assert (trained["model"] / "image_processor" / "preprocessor_config.json").is_file()


def test_an_edit_document_trains_the_queries_through_the_tower(trained):
    from mmfuse.engine.packing import Image
    from mmfuse.models.metaquery import make_batch

    model = MMFusePipeline.from_pretrained(trained["model"]).model.train()
    source = Image(picture_input(test_llava.PICTURES[0]), diffuse=False)
    docs = [[torch.tensor([1, 5, 6]), source, torch.tensor([7]), Image(torch.randn(4, 8, 8))],
            [torch.tensor([1, 8]), Image(torch.randn(4, 8, 8))]]
    batch = make_batch(model, docs, 16)
    assert batch.pieces is not None and isinstance(batch.pieces[0][1], dict)
    loss = model.training_loss(batch, torch.Generator().manual_seed(0)).total
    loss.backward()
    assert torch.isfinite(loss) and model.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.reader.parameters())
    # the source picture matters to the conditioning
    other = make_batch(model, [[torch.tensor([1, 5, 6]), Image(picture_input(test_llava.PICTURES[1]), False),
                                torch.tensor([7]), docs[0][-1]]], 16)
    with torch.no_grad():
        assert not torch.allclose(model.condition_pieces(batch.pieces[:1]), model.condition_pieces(other.pieces))


def test_editing_reads_the_source_through_the_tower(trained, tmp_path):
    pipe = MMFusePipeline.from_pretrained(trained["model"])
    assert isinstance(pipe.model, MetaQuery) and pipe.model.reader is not None
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    offline.picture("red", "square", size=(40, 22)).save(red)
    offline.picture("blue", "circle", size=(20, 30)).save(blue)
    kw = dict(num_inference_steps=2, seed=0, output_type="latent", guidance_scale=2.0, image_guidance_scale=1.5)
    cached = pipe("the same in another color", images=str(red), **kw).latents
    recomputed = pipe("the same in another color", images=str(red), recompute=True, **kw).latents
    assert torch.allclose(cached, recomputed, atol=1e-5)
    other = pipe("the same in another color", images=str(blue), **kw).latents
    assert not torch.allclose(cached, other, atol=1e-4)  # the MLLM sees the picture
    # two sources at their placeholders
    both = pipe("<image> and <image> together", images=[str(red), str(blue)], **kw).latents
    assert both.shape == cached.shape and not torch.allclose(both, cached, atol=1e-4)
    # the MetaQuery's MLLM answers about a picture too, read by the same tower
    assert isinstance(pipe.generate_text("what is this", images=str(red), max_new_tokens=3)[0], str)


def test_editing_from_the_cli_writes_a_png(trained, tmp_path):
    from PIL import Image

    src = tmp_path / "src.png"
    offline.picture("green", "square", size=(30, 30)).save(src)
    assert main(["generate", "--checkpoint", str(trained["model"]), "--image", str(src), "--prompt", "make it blue",
                 "--out", str(tmp_path / "edited.png"), "--steps", "2", "--seed", "0"]) == 0
    assert Image.open(tmp_path / "edited.png").size == (16, 16)


def test_source_pictures_need_a_vlm_base(tmp_path, monkeypatch):
    offline.qwen_base(tmp_path / "llm")
    offline.sana(tmp_path / "sana")
    offline.dc_vae(tmp_path / "vae")
    offline.captioned_pictures(tmp_path)
    line = {"segments": [{"image": "img/0.png", "diffuse": False}, {"text": "edit"}, {"image": "img/1.png"}]}
    (tmp_path / "edits.jsonl").write_text(json.dumps(line) + "\n")
    config = offline.write_config(tmp_path, family="metaquery", base="llm", diffusion="sana", vae="vae",
                                  metaquery=METAQUERY, data={"path": "edits.jsonl", "row_len": 16, "rows_per_batch": 1,
                                                             "num_workers": 0})
    from mmfuse.engine import run

    monkeypatch.setattr(run, "language_model", lambda *a, **k: pytest.fail("weights loaded before the data were checked"))
    with pytest.raises(SystemExit, match=r'edits.jsonl:1: a metaquery document with source images \("diffuse": false\) '
                                         "needs a VLM base"):
        main(["train", "--config", str(config)])
