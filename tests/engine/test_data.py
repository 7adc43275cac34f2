"""Training data: JSONL records of text and picture files (and datasets folders), read by workers into
documents; the ``mmfuse prepare`` cache; bad data named by file and line."""
import json

import pytest
import torch

from mmfuse.cli import main
from mmfuse.engine.config import load_run_config
from mmfuse.engine.data import DocumentReader, ImageData, ImageRef, drop_caption, read_records
from mmfuse.engine.run import batch_stream, set_up
from mmfuse.engine.text import prompt_ids
from mmfuse.models.vae import DiffusersVAE, LatentImages, ResizeCrop
from tests import offline
from tests.helpers import rel_err


def fusion_config(folder, **data):
    offline.llama_base(folder / "llm")
    offline.kl_vae(folder / "vae")
    if not (folder / "captions.jsonl").exists():
        offline.captioned_pictures(folder)
    return offline.write_config(folder, family="fusion", base="llm", vae="vae",
                                fusion={"latent_channels": 4, "latent_size": 4, "patch_size": 2, "timestep_dim": 32},
                                data={"path": "captions.jsonl", "row_len": 32, "rows_per_batch": 2, "num_workers": 0,
                                      **data})


def test_both_record_forms_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "sub" / "img").mkdir(parents=True)
    offline.picture("red", "square").save(tmp_path / "sub" / "img" / "a.png")
    (tmp_path / "sub" / "docs.jsonl").write_text(
        '{"text": "a red square", "image": "img/a.png"}\n\n'
        '{"segments": [{"text": "what is"}, {"image": "img/a.png", "diffuse": false}, {"text": [5, 6]}]}\n')
    records = read_records(tmp_path / "sub" / "docs.jsonl", vocab_size=50)
    assert len(records) == 2 and records[1].where == "docs.jsonl:3"
    pair, segments = records
    assert pair.segments[0] == "a red square" and pair.segments[1].key == "img/a.png" and pair.segments[1].diffuse
    assert segments.segments[2] == (5, 6) and not segments.segments[1].diffuse


def test_a_document_is_bos_text_images_eos(tmp_path):
    tok = offline.tiny_tokenizer()
    offline.picture("red", "square").save(tmp_path / "a.png")
    preprocess = ResizeCrop(8, 8)
    reader = DocumentReader(tok, type("Input", (), {"preprocess": preprocess, "tensor_name": "latent"})())
    image = ImageRef("a.png", path=str(tmp_path / "a.png"))
    caption_then_image = reader.read(_record(("a red square", image)))
    assert caption_then_image[0].tolist() == [tok.bos_token_id] and isinstance(caption_then_image[-1], ImageData)
    assert torch.cat([caption_then_image[0], caption_then_image[1]]).tolist() == prompt_ids(tok, "a red square")
    image_then_caption = reader.read(_record((image, "a red square")))
    assert image_then_caption[-1].tolist() == [tok.eos_token_id]  # EOS ends a document that ends in text
    assert image_then_caption[1].tensor.shape == (3, 8, 8) and image_then_caption[1].kind == "pixels"


def test_text_with_loss_false_is_read_but_not_trained_on(tmp_path):
    from mmfuse.engine.data import Untrained
    from mmfuse.engine.packing import PromptText, pack

    tok = offline.tiny_tokenizer()
    (tmp_path / "qa.jsonl").write_text(json.dumps({"segments": [{"text": "what is this", "loss": False},
                                                                {"text": "a red square"}]}) + "\n")
    record, = read_records(tmp_path / "qa.jsonl")
    assert record.segments[0] == Untrained("what is this") and record.segments[1] == "a red square"
    doc = DocumentReader(tok, None).read(record)
    assert isinstance(doc[1], PromptText) and doc[1].ids.tolist() == tok("what is this", add_special_tokens=False)["input_ids"]
    batch = pack([doc], 32, 4, 0, 1)
    question, answer = len(doc[1]), doc[2].numel() + 1  # the answer and EOS
    targets = batch.labels[0, 1:1 + question + answer].tolist()
    assert targets[:question] == [-100] * question and -100 not in targets[question:]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"segments": [{"text": "hi", "role": "system"},
                                                                  {"text": "what is this", "role": "user"},
                                                                  {"text": "a square", "role": "assistant"}]}) + "\n")
    chat, = read_records(tmp_path / "chat.jsonl")
    assert chat.segments == (Untrained("hi"), Untrained("what is this"), "a square")  # roles: who is trained
    for bad in ({"text": "x", "loss": "no"}, {"image": "a.png", "loss": False}, {"text": "x", "role": "robot"},
                {"text": "x", "role": "user", "loss": True}):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"segments": [bad]}) + "\n")
        with pytest.raises(Exception, match="bad.jsonl:1"):
            read_records(tmp_path / "bad.jsonl")


def _record(segments):
    from mmfuse.engine.data import Record

    return Record(tuple(segments), "test:1")


def test_caption_dropout_leaves_the_unconditional_prompt():
    image = ImageData(torch.zeros(1), True, "pixels")
    clean = ImageData(torch.zeros(1), False, "pixels")
    bos, text = torch.tensor([1]), torch.tensor([7, 8])
    assert drop_caption([bos, text, image, text]) == [image, text]  # BOS goes too: the empty prompt has no tokens
    assert drop_caption([bos, clean, text, image]) == [clean, image]  # a conditioning image stays
    assert drop_caption([bos, text]) == [bos, text]  # nothing to draw: nothing to drop


def test_resize_and_centre_crop_match_an_independent_reference(tmp_path):
    from PIL import Image

    img = offline.picture("blue", "circle", size=(30, 20))
    got = ResizeCrop(8, 8)(img)
    # reference: cover 8 x 8 (height 20 -> 8, width 30 -> 12), crop the middle 8 columns, scale to [-1, 1]
    ref = img.resize((12, 8), Image.LANCZOS).crop((2, 0, 10, 8))
    want = torch.tensor(list(ref.getdata()), dtype=torch.float32).view(8, 8, 3).permute(2, 0, 1) / 127.5 - 1
    assert got.shape == (3, 8, 8) and rel_err(got, want) <= 1e-6


def test_pictures_become_latents_in_the_batch(tmp_path):
    run = set_up(load_run_config(fusion_config(tmp_path)), torch.device("cpu"))
    assert isinstance(run.codec, DiffusersVAE) and run.codec.scaling_factor == 0.5
    assert isinstance(run.image_input, LatentImages) and run.image_input.preprocess.height == 8
    stream = batch_stream(run)
    batch = stream(0, 0)
    assert batch.images.shape[1:] == (4, 4, 4) and batch.images.shape[0] >= 1
    assert torch.equal(stream(0, 0).images, batch.images)  # a micro-batch is a function of its index
    assert not torch.equal(stream(1, 0).images, batch.images)


def test_prepare_caches_every_picture_once_and_training_reads_it(tmp_path):
    config = fusion_config(tmp_path, cache="cache")
    with pytest.raises(SystemExit, match="no prepared cache at .*mmfuse prepare"):
        main(["train", "--config", str(config)])
    assert main(["prepare", "--config", str(config), "--batch-size", "3"]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert sorted(index["entries"]) == [f"img/{i}.png" for i in range(8)]
    assert index["fingerprint"]["codec"]["scaling_factor"] == 0.5
    run = set_up(load_run_config(config), torch.device("cpu"))
    from mmfuse.engine.prepare import open_cache

    cache = open_cache(run.config.data, run.image_input)
    mean, std = cache.get("img/3.png")
    pixels = run.image_input.preprocess(offline.picture(*offline.CAPTIONS[3].split()[1:]))
    want_mean, want_std = run.image_input.moments(pixels[None])
    assert rel_err(mean, want_mean[0]) <= 1e-5 and rel_err(std, want_std[0]) <= 1e-5
    assert main(["train", "--config", str(config)]) == 0
    # a cache made for another VAE is refused, not silently used
    offline.kl_vae(tmp_path / "vae", scaling_factor=0.25)
    cfg = json.loads(config.read_text())
    cfg["train"]["out_dir"] = "run2"
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="prepared for another VAE or resolution"):
        main(["train", "--config", str(config)])


@pytest.mark.parametrize("problem", ["missing", "truncated", "not_an_image"])
def test_a_bad_picture_is_named_with_its_line(tmp_path, problem):
    offline.captioned_pictures(tmp_path)
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    if problem == "missing":
        lines[2] = json.dumps({"text": "a red square", "image": "img/gone.png"})
        message = r"captions.jsonl:3: image file img/gone.png not found"
    elif problem == "truncated":
        png = (tmp_path / "img" / "0.png").read_bytes()
        (tmp_path / "img" / "0.png").write_bytes(png[: len(png) // 2])
        lines = lines[:1]
        message = r"captions.jsonl:1: cannot read image img/0.png"
    else:
        (tmp_path / "img" / "notes.txt").write_text("hello")
        lines[0] = json.dumps({"text": "a", "image": "img/notes.txt"})
        message = r"captions.jsonl:1: image img/notes.txt is neither an image file"
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=message) as exc:
        main(["train", "--config", str(fusion_config(tmp_path))])
    assert "\n" not in str(exc.value)


def test_a_tokenizer_missing_from_the_base_is_named(tmp_path):
    config = fusion_config(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llm" / name).unlink()
    with pytest.raises(SystemExit, match="the data hold text but the run has no tokenizer"):
        main(["train", "--config", str(config)])
    cfg = json.loads(config.read_text())
    cfg["tokenizer"] = "nowhere"
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="tokenizer: no tokenizer in"):
        main(["train", "--config", str(config)])


def test_a_datasets_folder_reads_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": offline.CAPTIONS[:4], "image": [offline.picture(*c.split()[1:]) for c in offline.CAPTIONS[:4]]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image()})).save_to_disk(str(tmp_path / "ds"))
    config = fusion_config(tmp_path)
    cfg = json.loads(config.read_text())
    cfg["data"]["path"] = "ds"
    config.write_text(json.dumps(cfg))
    records = read_records(tmp_path / "ds")
    assert len(records) == 4 and records[2].segments[0] == offline.CAPTIONS[2]
    assert main(["train", "--config", str(config)]) == 0
    cfg["data"]["text_column"] = "caption"
    cfg["train"]["out_dir"] = "run2"
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"has no column\(s\) \['caption'\]"):
        main(["train", "--config", str(config)])


def test_bad_data_is_reported_before_any_weights_load(tmp_path):
    config = fusion_config(tmp_path)
    (tmp_path / "llm" / "model.safetensors").write_bytes(b"not weights")  # loading them would fail first
    (tmp_path / "captions.jsonl").write_text('{"text": "a red square", "image": "img/none.png"}\n')
    with pytest.raises(SystemExit, match="captions.jsonl:1: image file img/none.png not found"):
        main(["train", "--config", str(config)])
    (tmp_path / "captions.jsonl").write_text('{"text": "a red square", "image": "img/0.png"}\n')
    with pytest.raises(SystemExit, match="not a readable safetensors file"):  # and the checkpoint, by name
        main(["train", "--config", str(config)])


def test_a_mixture_gives_every_micro_batch_its_sources_in_proportion(tmp_path):
    from itertools import islice

    from mmfuse.engine.data import weighted_turns

    assert list(islice(weighted_turns([0.5, 0.5]), 6)) == [0, 1, 0, 1, 0, 1]
    assert list(islice(weighted_turns([0.7, 0.2, 0.1]), 10)).count(0) == 7
    offline.captioned_pictures(tmp_path)
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    (tmp_path / "draw.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "text.jsonl").write_text('{"segments": [{"text": "what is this"}]}\n')
    config = fusion_config(tmp_path)
    cfg = json.loads(config.read_text())
    cfg["data"].update(path=[{"path": "draw.jsonl", "weight": 3}, {"path": "text.jsonl", "weight": 1}],
                       rows_per_batch=4)
    config.write_text(json.dumps(cfg))
    run = set_up(load_run_config(config), torch.device("cpu"))
    stream = batch_stream(run)
    docs = stream.batches.documents(0)
    with_image = [any(isinstance(s, ImageData) for s in d) for d in docs]
    assert with_image[:8] == [True, True, False, True, True, True, False, True]  # 3 : 1, in every stretch
    # the counts per source, keyed by name (the file's stem): documents and their text tokens
    drawn, texts = [d for d, img in zip(docs, with_image) if img], [d for d, img in zip(docs, with_image) if not img]
    text_tokens = lambda ds: sum(len(s) for d in ds for s in d if not isinstance(s, ImageData))  # noqa: E731
    assert docs.counts == {"docs/draw": len(drawn), "docs/text": len(texts), "tokens/draw": text_tokens(drawn),
                           "tokens/text": text_tokens(texts)}
    # over many micro-batches each source's share of documents is its weight's, within a few percent
    totals = [stream.batches.documents(i).counts for i in range(40)]
    share = sum(t["docs/draw"] for t in totals) / sum(t["docs/draw"] + t["docs/text"] for t in totals)
    assert abs(share - 0.75) < 0.03
    # and the training log carries them, step by step
    cfg["data"]["path"] = [{"path": "draw.jsonl", "weight": 3, "name": "pictures"}, {"path": "text.jsonl", "weight": 1}]
    config.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(config)]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["docs/pictures"] > 0 and r["docs/text"] > 0 and r["tokens/text"] > 0 for r in log)
    cfg["data"]["path"] = [{"path": "draw.jsonl", "name": "x"}, {"path": "text.jsonl", "name": "x"}]
    cfg["train"]["out_dir"] = "run2"
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="share a name"):
        main(["train", "--config", str(config)])
    for bad, message in (([], "an empty mixture"), ([{"path": "a.jsonl", "weight": 0}], r"path\[0\] must be")):
        cfg["data"]["path"] = bad
        config.write_text(json.dumps(cfg))
        with pytest.raises(SystemExit, match=message):
            main(["train", "--config", str(config)])
