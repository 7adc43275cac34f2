"""The diffusers denoisers (SANA, SD1.5 UNet): built from a config, loaded from a safetensors folder."""
import json

import pytest

from mmfuse.models.denoisers import build_denoiser, denoiser_config, denoiser_kind, load_denoiser
from mmfuse.models.hf_io import CheckpointError
from tests import offline
from tests.models.test_metaquery import SANA


def test_a_config_with_an_unknown_key_is_refused_before_building():
    with pytest.raises(ValueError, match=r"SanaTransformer2DModel takes no key\(s\) \['bogus'\]"):
        build_denoiser("sana", {**SANA, "bogus": 1})
    built = build_denoiser("sana", SANA)
    assert denoiser_kind(built) == "sana" and denoiser_config(built)["caption_channels"] == SANA["caption_channels"]
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_denoiser("flux", SANA)


def test_folders_load_by_class_and_only_from_safetensors(tmp_path):
    offline.sana(tmp_path / "sana")
    assert denoiser_kind(load_denoiser(tmp_path / "sana", "sana")) == "sana"
    with pytest.raises(CheckpointError, match="holds a SanaTransformer2DModel, but decoder 'sd15' needs a UNet2D"):
        load_denoiser(tmp_path / "sana", "sd15")
    (tmp_path / "sana" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only safetensors weights load"):
        load_denoiser(tmp_path / "sana", "sana")
    with pytest.raises(CheckpointError, match="no diffusers model folder"):
        load_denoiser(tmp_path / "none", "sana")
    assert json.loads((tmp_path / "sana" / "config.json").read_text())["_class_name"] == "SanaTransformer2DModel"
