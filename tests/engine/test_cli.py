import json
import subprocess
import sys

import pytest

from mmfuse.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_exists():
    parser = build_parser()
    assert parser.parse_args(["demo"]).command == "demo"
    assert parser.parse_args(["bench"]).command == "bench"
    assert parser.parse_args(["train", "--config", "c.json"]).command == "train"
    assert parser.parse_args(["train", "--config", "c.json", "--resume"]).resume is True
    assert parser.parse_args(["train", "--config", "c.json", "--resume", "run/step_0000002"]).resume == "run/step_0000002"
    assert parser.parse_args(["prepare", "--config", "c.json"]).command == "prepare"
    assert parser.parse_args(["generate", "--checkpoint", "m", "--prompt-ids", "1"]).command == "generate"
    assert parser.parse_args(["generate", "--checkpoint", "m", "--prompt", "a cat", "--out", "x.png"]).out == "x.png"


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_documents_itself(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) > 8
    if command == "train":  # the config schema, every family's section, data and train fields
        for word in ("fusion", "metamorph", "metaquery", "caption_dropout", "checkpoint_every", "--resume",
                     '{"text": "...", "image": "a.png"}'):
            assert word in text, word


def test_demo_end_to_end_with_few_steps(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--per-class", "1", "--sample-steps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "caption accuracy" in printed and "generation accuracy" in printed and "tokens/s" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["caption_accuracy"] <= 1.0 and 0.0 <= metrics["generation_accuracy"] <= 1.0
    assert 0.0 <= metrics["editing_accuracy"] <= 1.0 and "editing accuracy" in printed
    assert metrics["tokens_per_s"] > 0 and metrics["images_per_s"] > 0
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size == (1 * 33 + 1, 10 * 33 + 1)  # 10 classes x 1, 32 px each
    assert Image.open(tmp_path / "edits.png").size == (2 * 33 + 1, 10 * 33 + 1)  # 10 rows of source | edit
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    assert (tmp_path / "run" / "latest").is_file()
    # the user's path: the exported data folder (PNGs, captions, tokenizer, config) and the model folder
    assert (tmp_path / "data" / "img" / "00000.png").is_file() and (tmp_path / "data" / "run.json").is_file()
    assert (tmp_path / "data" / "cache" / "index.json").is_file()
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--prompt", "draw 7", "--steps", "2",
                 "--out", str(tmp_path / "7.png")]) == 0
    assert Image.open(tmp_path / "7.png").size == (8, 8)
    edit = tmp_path / "data" / "edit.jsonl"
    first = json.loads(edit.read_text().splitlines()[0])["segments"]
    assert first[0]["diffuse"] is False and first[1]["text"].startswith("make ") and "image" in first[2]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--image",
                 str(tmp_path / "data" / "img" / "00000.png"), "--prompt", "caption <image>", "--max-new-tokens", "2"]) == 0
    from mmfuse.engine.demo import WORDS

    words = capsys.readouterr().out.split()  # three steps of training: words of the vocabulary, not yet the digit
    assert len(words) <= 2 and all(w in WORDS for w in words)


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--steps"):
        main(["demo", "--steps", "0"])


def test_bench_subcommand_is_built(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])  # `main(["bench"])` would run every benchmark: tests/bench/ covers the runner
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mmfuse", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout


def test_the_command_line_starts_without_torch():
    """`mmfuse --help` and `import mmfuse` load no torch or transformers (the start-up benchmark times them);
    transformers still finds attn_implementation="mmfuse" once its models load."""
    code = ("import sys, mmfuse; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from mmfuse.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'the top-level help imported torch'\n"
            "from transformers import AttentionInterface; assert 'mmfuse' in AttentionInterface._global_mapping\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
