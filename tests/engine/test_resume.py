"""``mmfuse train --resume``: a training process killed mid-run and resumed gives the uninterrupted run's
losses exactly; an existing run is never overwritten by accident."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmfuse.cli import main
from tests import offline

STEPS = 40


def run_config(folder, steps=STEPS, **train):
    offline.llama_base(folder / "llm")
    offline.kl_vae(folder / "vae")
    offline.captioned_pictures(folder)
    return offline.write_config(
        folder, family="fusion", base="llm", vae="vae",
        fusion={"latent_channels": 4, "latent_size": 4, "patch_size": 2, "timestep_dim": 32},
        data={"path": "captions.jsonl", "row_len": 32, "rows_per_batch": 2, "num_workers": 0},
        train={"steps": steps, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 3, "seed": 7, **train})


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_killed_run_resumes_to_the_uninterrupted_losses(tmp_path):
    straight = run_config(tmp_path / "straight")
    assert main(["train", "--config", str(straight)]) == 0
    want = losses(tmp_path / "straight" / "run")
    assert len(want) == STEPS

    config = run_config(tmp_path / "killed")
    run = tmp_path / "killed" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmfuse", "train", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "latest").is_file() or (run / "latest").read_text() < "step_0000006":
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: between checkpoints, perhaps mid-write
    proc.wait()
    reached = len(losses(run))
    assert reached < STEPS and not (run / "model").exists()

    with pytest.raises(SystemExit, match="already holds a run; continue it with --resume"):
        main(["train", "--config", str(config)])  # refused, nothing overwritten
    assert len(losses(run)) == reached

    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert losses(run) == want  # bit for bit, each step logged once
    assert (run / "model" / "model.safetensors").is_file() and not list(run.glob(".tmp-*"))


def test_resume_from_a_given_checkpoint_and_from_nothing(tmp_path):
    config = run_config(tmp_path, steps=4)
    assert main(["train", "--config", str(config)]) == 0
    want = losses(tmp_path / "run")
    other = tmp_path / "again.json"  # the same run, into another folder
    cfg = json.loads(config.read_text())
    cfg["train"]["out_dir"] = "again"
    other.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(other), "--resume", str(tmp_path / "run" / "step_0000003")]) == 0
    assert losses(tmp_path / "again") == want
    fresh = tmp_path / "fresh.json"
    cfg["train"]["out_dir"] = "fresh"
    fresh.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(fresh), "--resume"]) == 0  # nothing to resume yet: starts at step 0
    assert losses(tmp_path / "fresh") == want
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        main(["train", "--config", str(fresh), "--resume", str(tmp_path / "nowhere")])


def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    config = run_config(tmp_path, steps=1)
    assert main(["train", "--config", str(config)]) == 0
    trainer = json.loads((tmp_path / "run" / "step_0000001" / "trainer.json").read_text())
    assert trainer["family"] == "fusion" and trainer["model_type"] == "mmfuse_fusion"
    trainer["family"], trainer["model_type"] = "metaquery", "mmfuse_metaquery"
    (tmp_path / "run" / "step_0000001" / "trainer.json").write_text(json.dumps(trainer))
    with pytest.raises(SystemExit, match="another run: family 'metaquery'"):
        main(["train", "--config", str(config), "--resume"])


def test_the_same_config_and_seed_give_bit_identical_runs(tmp_path):
    runs = []
    for name in ("a", "b"):
        config = run_config(tmp_path / name, steps=3)
        assert main(["train", "--config", str(config)]) == 0
        runs.append(losses(tmp_path / name / "run"))
    assert runs[0] == runs[1] and len(runs[0]) == 3
    cfg = json.loads(config.read_text())
    cfg["train"].update(seed=8, out_dir="other")
    config.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(config)]) == 0
    assert losses(tmp_path / "b" / "other") != runs[0]  # the seed is what makes them equal


def test_a_run_that_failed_before_its_first_step_can_simply_be_run_again(tmp_path):
    config = run_config(tmp_path, steps=1)
    good = (tmp_path / "img" / "0.png").read_bytes()
    (tmp_path / "img" / "0.png").write_bytes(good[: len(good) // 2])
    cfg = json.loads(config.read_text())
    cfg["data"]["path"] = "one.jsonl"
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a red square", "image": "img/0.png"}) + "\n")
    config.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="one.jsonl:1: cannot read image img/0.png"):
        main(["train", "--config", str(config)])
    (tmp_path / "img" / "0.png").write_bytes(good)  # fixed: no step was taken, so no --resume is needed
    assert main(["train", "--config", str(config)]) == 0
