"""``mmfuse profile`` on a tiny run config (CPU): the report's groups add up to the step, the trace
and the table are written, operators land in their groups, bad arguments are named."""
import json
from pathlib import Path

import pytest

from mmfuse.cli import main
from mmfuse.engine.profile import group_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("family", ["fusion", "metamorph"])
def test_profile_a_run_config(tmp_path, capsys, family):
    out = tmp_path / "prof"
    assert main(["profile", "--config", str(EXAMPLES / f"{family}.json"), "--steps", "2", "--sample",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for words in ("tokens/s", "images/s", "peak memory", "attention", "GEMMs", "optimizer",
                  "data loading and packing", "one image through the pipeline", "trace.json"):
        assert words in printed, words
    report = json.loads((out / "profile.json").read_text())
    groups = {r["group"]: r for r in report["groups"]}
    assert set(groups) == {"attention", "losses", "GEMMs (routed / dense)", "norms / RoPE / SwiGLU", "other",
                           "optimizer", "data loading and packing"}
    assert sum(r["ms_per_step"] for r in report["groups"]) == pytest.approx(report["step_ms"], rel=1e-6)
    assert sum(r["share"] for r in report["groups"]) == pytest.approx(1.0, rel=1e-6)
    assert groups["attention"]["ms_per_step"] > 0 and groups["GEMMs (routed / dense)"]["ms_per_step"] > 0
    assert report["images_per_s"] > 0 and report["mfu"] is None  # no MFU without a GPU's peak
    assert report["sample"]["ms"] > 0 and "denoise_ms" in report["sample"]
    trace = json.loads((out / "trace.json").read_text())
    assert any("mixed_attention" in e.get("name", "") for e in trace["traceEvents"])


def test_operators_land_in_their_groups():
    assert group_of("mmfuse::mixed_attention_bwd") == "attention"
    assert group_of("GeneratedBackwardFor_mmfuse_routed_gate_up_swiglu_default") == "GEMMs (routed / dense)"
    assert group_of("mmfuse::routed_rms_norm") == "norms / RoPE / SwiGLU"
    assert group_of("mmfuse::linear_cross_entropy_fwd") == "losses"
    assert group_of("aten::index_select") == "other"


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["profile", "--config", str(EXAMPLES / "fusion.json"), "--steps", "0"])
    with pytest.raises(SystemExit, match="no config file"):
        main(["profile", "--config", str(tmp_path / "missing.json")])
