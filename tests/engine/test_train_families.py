"""``mmfuse train --config`` for the MetaMorph and MetaQuery families, end to end on tiny checkpoints."""
import json

import pytest
import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import save_file

from mmfuse.cli import main
from mmfuse.models import MetaQuery, from_pretrained
from mmfuse.models.metamorph import MetaMorph
from tests.models.test_decoder import tiny_llama, tiny_qwen2
from tests.models.test_metaquery import COND, QWEN, SANA
from tests.models.test_siglip import TINY, tiny_vision

METAMORPH = {"num_visual_tokens": 4, "boi_token_id": 3, "eoi_token_id": 4, "sd_cross_attention_dim": 32}
METAQUERY = {"num_queries": 3, "connector_layers": 1, "connector_dim": 32, "connector_heads": 2,
             "connector_hidden_dim": 48, "cond_dim": COND, "decoder": "sana"}


def write_documents(folder, name: str, shape: tuple[int, ...], prompts: list[list[int]], suffix=(5,)) -> None:
    lines = []
    for i, prompt in enumerate(prompts):
        save_file({name: torch.randn(shape)}, str(folder / f"img{i}.safetensors"))
        segments = [{"text": prompt}, {"image": f"img{i}.safetensors"}] + ([{"text": list(suffix)}] if suffix else [])
        lines.append(json.dumps({"segments": segments}))
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")


def write_config(folder, **cfg) -> str:
    cfg.setdefault("train", {"steps": 2, "lr": 1e-3, "warmup_steps": 1})
    cfg["data"] = {"num_workers": 0, **cfg["data"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder / "config.json")


def changed(before: torch.nn.Module, after: torch.nn.Module, prefix: str) -> bool:
    old, new = before.state_dict(), after.state_dict()
    return any(not torch.equal(old[k], new[prefix + k]) for k in old)


def test_train_metamorph_keeps_siglip_frozen_and_trains_the_rest(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llm")
    tiny_vision().save_pretrained(tmp_path / "vision")
    size = TINY["image_size"]
    write_documents(tmp_path, "pixels", (3, size, size), [[10, 11], [12], [13, 14, 15]])
    cfg = write_config(tmp_path, family="metamorph", base=str(tmp_path / "llm"), vision=str(tmp_path / "vision"),
                       metamorph=METAMORPH, data={"path": "docs.jsonl", "row_len": 16, "rows_per_batch": 2})
    assert main(["train", "--config", cfg]) == 0
    trained = from_pretrained(tmp_path / "run" / "model")
    assert isinstance(trained, MetaMorph)
    assert not changed(from_pretrained(tmp_path / "vision"), trained.vision, "")  # the tower stays frozen
    assert changed(from_pretrained(tmp_path / "llm"), trained.decoder, "")  # the LLM trains
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"lm", "cosine"} <= set(log[0]) and log[0]["images"] > 0


@pytest.mark.parametrize("diffusion_from", ["config", "folder"])
def test_train_metaquery_keeps_the_llm_frozen(tmp_path, diffusion_from):
    torch.manual_seed(0)
    tiny_qwen2(**QWEN).save_pretrained(tmp_path / "llm")
    if diffusion_from == "folder":
        SanaTransformer2DModel(**SANA).save_pretrained(tmp_path / "sana")
        diffusion = str(tmp_path / "sana")
    else:
        diffusion = SANA
    write_documents(tmp_path, "latent", (4, 8, 8), [[10, 11], [12], [], [13, 14, 15]], suffix=())
    cfg = write_config(tmp_path, family="metaquery", base=str(tmp_path / "llm"), metaquery=METAQUERY,
                       diffusion=diffusion, data={"path": "docs.jsonl", "row_len": 8, "rows_per_batch": 3})
    assert main(["train", "--config", cfg]) == 0
    trained = from_pretrained(tmp_path / "run" / "model")
    assert isinstance(trained, MetaQuery)
    assert not changed(from_pretrained(tmp_path / "llm"), trained.llm, "")
    if diffusion_from == "folder":
        assert changed(SanaTransformer2DModel.from_pretrained(tmp_path / "sana"), trained.diffusion, "")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[0]["images"] == 3


@pytest.mark.parametrize(
    "segments,message",
    [
        ([{"image": "img0.safetensors"}, {"text": [5]}], "docs.jsonl:2: a metaquery document is a prompt "
                                                          r"\(text, and source images .* followed by exactly one "
                                                          "target image"),
        ([{"image": "img0.safetensors"}, {"image": "img0.safetensors"}], "docs.jsonl:2: a metaquery document is a "
                                                                         "prompt .* followed by exactly one target"),
        ([{"text": list(range(9))}, {"image": "img0.safetensors"}], "docs.jsonl:1: its prompt is longer than "
                                                                    r"data.row_len \(8\)"),
    ],
)
def test_train_metaquery_reports_bad_documents(tmp_path, segments, message):
    write_documents(tmp_path, "latent", (4, 8, 8), [[10]], suffix=())
    if "longer" in message:  # found when a worker reads it: the only document, so the first batch has it
        (tmp_path / "docs.jsonl").write_text("")
    with open(tmp_path / "docs.jsonl", "a") as f:
        f.write(json.dumps({"segments": segments}) + "\n")
    cfg = write_config(tmp_path, family="metaquery", decoder={"vocab_size": 20, "dim": 32, "hidden_dim": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
                       metaquery=METAQUERY, diffusion=SANA, data={"path": "docs.jsonl", "row_len": 8})
    with pytest.raises(SystemExit, match=message):
        main(["train", "--config", cfg])


def test_train_metaquery_reports_a_missing_diffusion_decoder(tmp_path):
    write_documents(tmp_path, "latent", (4, 8, 8), [[10]], suffix=())
    cfg = write_config(tmp_path, family="metaquery", decoder={"vocab_size": 20, "dim": 32, "hidden_dim": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
                       metaquery=METAQUERY, diffusion=str(tmp_path / "nope"), data={"path": "docs.jsonl"})
    with pytest.raises(SystemExit, match="diffusion: no diffusers model folder"):
        main(["train", "--config", cfg])


def test_a_conditioning_width_mismatch_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import mmfuse.engine.run as run_module

    write_documents(tmp_path, "latent", (4, 8, 8), [[10]], suffix=())
    cfg = write_config(tmp_path, family="metaquery", decoder={"vocab_size": 20, "dim": 32, "hidden_dim": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
                       metaquery={**METAQUERY, "cond_dim": COND + 8}, diffusion=SANA, data={"path": "docs.jsonl"})
    monkeypatch.setattr(run_module, "load_parts", lambda *a: pytest.fail("parts were loaded"))
    with pytest.raises(SystemExit, match=f"metaquery: cond_dim={COND + 8} but the sana decoder's conditioning width "
                                         f"is {COND}"):
        main(["train", "--config", cfg])
