"""mmfuse train --config and mmfuse generate on the fast path (token ids, ready latents), and their errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mmfuse.cli import main
from mmfuse.engine import generate
from mmfuse.models import from_pretrained
from mmfuse.models.fusion import LlamaFusion
from tests import offline
from tests.models.test_decoder import tiny_llama

FUSION = {"latent_channels": 4, "latent_size": 4, "patch_size": 2, "boi_token_id": 1, "eoi_token_id": 2,
          "timestep_dim": 32}
DECODER = {"vocab_size": 20, "dim": 32, "hidden_dim": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
           "head_dim": 16, "tie_embeddings": True}


def write_run(tmp_path, **overrides) -> str:
    lines = []
    for i in range(6):
        save_file({"latent": torch.randn(4, 4, 4)}, str(tmp_path / f"img{i}.safetensors"))
        lines.append(json.dumps({"segments": [{"text": [3, 4 + i]}, {"image": f"img{i}.safetensors"}, {"text": [5]}]}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    offline.kl_vae(tmp_path / "vae")
    cfg = {"family": "fusion", "base": None, "decoder": DECODER, "fusion": FUSION, "vae": "vae",
           "data": {"path": "docs.jsonl", "row_len": 24, "rows_per_batch": 2, "num_workers": 0},
           "train": {"steps": 3, "lr": 1e-3, "warmup_steps": 1}}
    cfg.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


def test_train_on_ids_and_ready_latents_then_generate(tmp_path, capsys):
    assert main(["train", "--config", write_run(tmp_path)]) == 0
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "step_0000003"
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3
    model = from_pretrained(run / "model")
    assert isinstance(model, LlamaFusion)
    out = tmp_path / "img.png"
    assert main(["generate", "--checkpoint", str(run / "model"), "--prompt-ids", "3,4", "--steps", "2",
                 "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (8, 8) and Image.open(out).mode == "RGB"  # 4 x 4 latents, VAE x2
    assert main(["generate", "--checkpoint", str(run / "model"), "--prompt-ids", "3,4", "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 4


def test_train_from_a_base_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")  # no tokenizer: fine while the data are token ids
    cfg = write_run(tmp_path, base=str(tmp_path / "base"), decoder=None, train={"steps": 1, "warmup_steps": 1})
    assert main(["train", "--config", cfg]) == 0
    trained = from_pretrained(tmp_path / "run" / "model")
    assert not trained.decoder.layers[0].attn.qkv.weights[0].requires_grad  # LlamaFusion: text stays frozen


@pytest.mark.parametrize(
    "change,message",
    [
        ({"family": "dalle"}, "family 'dalle' is not one mmfuse knows"),
        ({"family": "metamorph"}, r"unknown key\(s\) \['fusion'\] for family 'metamorph'"),
        ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({"fusion": {**FUSION, "patchsize": 2}}, r"fusion: unknown key\(s\) \['patchsize'\]"),
        ({"fusion": {**FUSION, "patch_size": "2"}}, r"fusion.patch_size: expected int, got \"2\""),
        ({"train": {"stepz": 3}}, r"train: unknown key\(s\) \['stepz'\]"),
        ({"train": {"steps": 0}}, "steps must be >= 1, got 0"),
        ({"data": {"path": "missing.jsonl"}}, "no data file"),
        ({"data": {"row_len": 8}}, r"data: missing required key\(s\) \['path'\]"),
        ({"decoder": None}, "give 'base'"),
        ({"decoder": {"vocab_size": 20}}, r"decoder: missing required key\(s\) \['dim'"),
        ({"base": "/nonexistent/checkpoint", "decoder": None}, "config.json"),
        ({"vae": {"pixels": 1}}, "vae must be a folder path"),
        ({"vae": "nope"}, "no VAE folder"),
        ({"train": {"steps": -5}}, r"train: bad training config: steps must be >= 1, got -5$"),
        ({"vision": 3}, "unknown key"),  # fusion takes no vision tower
        ({"decoder": {}}, r"decoder: missing required key\(s\) \['vocab_size', 'dim'"),
    ],
)
def test_train_reports_bad_configs(tmp_path, change, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--config", write_run(tmp_path, **change)])


def test_train_reports_a_bad_document_line(tmp_path):
    cfg = write_run(tmp_path)
    with open(tmp_path / "docs.jsonl", "a") as f:
        f.write('{"segments": [{"image": "nope.safetensors"}]}\n')
    with pytest.raises(SystemExit, match=r"docs.jsonl:7: image file nope.safetensors not found"):
        main(["train", "--config", cfg])


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"segments": [{"text": [3, 99]}]}', r"docs.jsonl:1: token id 99 is outside the vocabulary \[0, 20\)"),
        ('{"segments": [{"text": [3, -1]}]}', "token id -1 is outside"),
        ('{"segments": [{"image": "bad.safetensors"}]}', r"docs.jsonl:1: bad.safetensors is not a readable safetensors"),
        ('{"segments": [{"image": "wide.safetensors"}]}', r"wide.safetensors's 'latent' has shape \(4, 4, 8\)"),
        ('{"segments": [{"text": "words"}]}', "the data hold text but the run has no tokenizer"),
        ('{"text": "a", "picture": "x.png"}', "docs.jsonl:1: a document is"),
    ],
)
def test_train_reports_bad_data_in_one_line(tmp_path, line, message):
    cfg = write_run(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    save_file({"latent": torch.randn(4, 4, 8)}, str(tmp_path / "wide.safetensors"))
    (tmp_path / "docs.jsonl").write_text(line + "\n")
    with pytest.raises(SystemExit, match=message) as exc:
        main(["train", "--config", cfg])
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "run" / "model").exists()


def test_generate_text_equals_the_engine(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7", "--max-new-tokens", "5"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    want = generate(from_pretrained(tmp_path), torch.tensor([[5, 6, 7]]), 5)
    assert printed == want[0].tolist()


def test_fusion_text_generation_equals_its_base_decoder(tmp_path):
    from mmfuse.models.fusion import FusionConfig

    tiny_llama().save_pretrained(tmp_path)
    base = from_pretrained(tmp_path)
    fusion = LlamaFusion.from_decoder(base, FusionConfig(**FUSION))
    ids = torch.randint(5, 90, (2, 6))
    assert torch.equal(generate(fusion.decoder, ids, 6), generate(base, ids, 6))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent"], "no checkpoint folder"),
        (["--prompt-ids", "a,b"], "comma-separated integers"),
        (["--out", "x.png"], "writes text, not images"),
        (["--out", "x.jpg"], "must name a .png file"),
        (["--out", "/nonexistent/x.png"], "no folder"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--guidance", "0.5"], r"--guidance must be >= 1 \(1 = no guidance\), got 0.5"),
        (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0, got -2"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--prompt-ids", "5,500"], r"must lie in \[0, 101\)"),
        (["--prompt", "hello"], "no tokenizer"),
        (["--device", "cuda:7"], "no CUDA device" if not torch.cuda.is_available() else "invalid device"),
    ],
)
def test_generate_reports_bad_arguments(tmp_path, args, message):
    tiny_llama().save_pretrained(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "5,1"]
    for flag in ("--checkpoint", "--prompt-ids"):
        if flag in args or (flag == "--prompt-ids" and "--prompt" in args):
            i = base.index(flag)
            del base[i:i + 2]
    with pytest.raises(SystemExit, match=message):
        main(base + args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_on_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^mmfuse train: --device cuda: no CUDA device is available") as exc:
        main(["train", "--config", write_run(tmp_path), "--device", "cuda"])
    assert "\n" not in str(exc.value)
