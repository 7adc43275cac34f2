"""The example run configs the repository ships (examples/*.json) train and draw as they are."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("family", ["fusion", "metamorph", "metaquery"])
def test_an_example_config_trains_and_draws(tmp_path, family):
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("runs"))
    config = folder / f"{family}.json"
    assert json.loads(config.read_text())["family"] == family
    assert main(["train", "--config", str(config)]) == 0
    model = folder / "runs" / family / "model"
    assert main(["generate", "--checkpoint", str(model), "--prompt", "a red square", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 0
    image = Image.open(tmp_path / "x.png")
    assert image.mode == "RGB" and image.size == (16, 16)
