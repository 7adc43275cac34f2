import subprocess
import sys

import pytest

from mmfuse.engine.cli import build_parser, main


def test_every_subcommand_exists():
    parser = build_parser()
    for name in ("demo", "train", "generate", "bench"):
        assert parser.parse_args([name]).command == name


def test_unbuilt_subcommand_says_so(capsys):
    assert main(["train"]) == 0
    assert "not yet built" in capsys.readouterr().err


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mmfuse", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout
