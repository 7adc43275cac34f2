import json
import subprocess
import sys

import pytest

from mmfuse.engine.cli import build_parser, main


def test_every_subcommand_exists():
    parser = build_parser()
    assert parser.parse_args(["demo"]).command == "demo"
    assert parser.parse_args(["bench"]).command == "bench"
    assert parser.parse_args(["train", "--config", "c.json"]).command == "train"
    assert parser.parse_args(["generate", "--checkpoint", "m", "--prompt-ids", "1"]).command == "generate"


def test_demo_end_to_end_with_few_steps(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--per-class", "1", "--sample-steps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "caption accuracy" in printed and "generation accuracy" in printed and "tokens/s" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["caption_accuracy"] <= 1.0 and 0.0 <= metrics["generation_accuracy"] <= 1.0
    assert metrics["tokens_per_s"] > 0 and metrics["images_per_s"] > 0
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size == (1 * 33 + 1, 10 * 33 + 1)  # 10 classes x 1, 32 px each
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    assert (tmp_path / "run" / "latest").is_file()


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
