"""The training loop on a tiny LlamaFusion: schedule, NaN guard, atomic checkpoints, exact resume."""
import json

import pytest
import torch

from mmfuse.engine.train import TrainConfig, Trainer, lr_at
from mmfuse.kernels.objectives import Objective
from mmfuse.models.fusion import LlamaFusion
from tests.models.test_fusion import FUSION, base, interleaved_batch  # noqa: F401  (fixture)


def make_trainer(base_model, tmp_path, steps, **overrides):  # noqa: F811
    torch.manual_seed(0)  # the image path's fresh layers: same init in every trainer
    fusion = LlamaFusion.from_decoder(base_model, FUSION)
    data = [interleaved_batch(FUSION, 101, torch.Generator().manual_seed(i)) for i in range(3)]

    def get_batch(step, micro):
        return data[(step * 2 + micro) % len(data)]

    def loss_fn(batch, generator):
        return fusion.training_loss(batch, generator)

    config = TrainConfig(steps=steps, lr=1e-3, warmup_steps=2, grad_accum=2, out_dir=str(tmp_path), **overrides)
    return Trainer(fusion, loss_fn, get_batch, config, count=lambda b: {"tokens": int((b.modality == 0).sum()), "images": 1},
                   blocks=list(fusion.decoder.layers))



def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0) and lr_at(55, c) == pytest.approx(0.55)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_resume_reproduces_the_uninterrupted_run(base, tmp_path):  # noqa: F811
    straight = make_trainer(base, tmp_path / "a", steps=4)
    straight.train(progress=False)
    first = make_trainer(base, tmp_path / "b", steps=2)
    first.train(progress=False)  # checkpoints step 2
    resumed = make_trainer(base, tmp_path / "c", steps=4)
    resumed.load_checkpoint(tmp_path / "b")
    assert resumed.step == 2
    resumed.train(progress=False)
    want = [r["loss"] for r in straight.history]
    got = [r["loss"] for r in resumed.history]
    assert got == want  # exactly, not approximately
    assert all(r["loss"] > 0 for r in straight.history)


def test_checkpoint_layout_is_safetensors_and_latest_is_atomic(base, tmp_path):  # noqa: F811
    trainer = make_trainer(base, tmp_path, steps=2, checkpoint_every=1)
    trainer.train(progress=False)
    assert (tmp_path / "latest").read_text() == "step_0000002"
    names = sorted(p.name for p in (tmp_path / "step_0000002").iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"]
    assert not list(tmp_path.glob(".tmp*"))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[-1]["tokens"] > 0 and "tokens_per_s" in log[-1]


def test_crash_mid_write_leaves_the_previous_checkpoint(base, tmp_path, monkeypatch):  # noqa: F811
    trainer = make_trainer(base, tmp_path, steps=1)
    trainer.train(progress=False)
    import mmfuse.engine.train as train_mod

    def boom(*args, **kwargs):
        raise OSError("disk full")

    trainer.step = 5
    monkeypatch.setattr(train_mod, "save_file", boom)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert (tmp_path / "latest").read_text() == "step_0000001"
    fresh = make_trainer(base, tmp_path / "x", steps=1)
    fresh.load_checkpoint(tmp_path)
    assert fresh.step == 1


def test_nan_loss_stops_the_run_naming_the_step(base, tmp_path):  # noqa: F811
    trainer = make_trainer(base, tmp_path, steps=5)
    real = trainer.loss_fn

    def poisoned(batch, generator):
        objective = real(batch, generator)
        if trainer.step == 2:
            return Objective(objective.total * float("nan"), objective.components)
        return objective

    trainer.loss_fn = poisoned
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train(progress=False)


def test_bad_config_and_missing_checkpoint(base, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(base, tmp_path, steps=1).load_checkpoint(tmp_path / "nothing")


def test_activation_checkpointing_gives_the_same_loss_and_gradients(base, tmp_path):  # noqa: F811
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(base, tmp_path / str(checkpointing), steps=1, activation_checkpointing=checkpointing)
        trainer.model.train()
        batch = trainer.get_batch(0, 0)
        objective = trainer.loss_fn(batch, torch.Generator().manual_seed(3))
        objective.total.backward()
        grad = trainer.model.decoder.layers[0].mlp.gate_up.weights[1].grad.clone()
        results.append((objective.total.detach(), grad))
        wrapped = trainer.model.decoder.layers[0].forward.__name__ == "checkpointed"
        assert wrapped is checkpointing
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)


def test_ema_follows_its_definition_and_resumes_exactly(base, tmp_path):  # noqa: F811
    trainer = make_trainer(base, tmp_path / "a", steps=3, ema_decay=0.8)
    name = "decoder.layers.0.attn.qkv.weights.1"
    param = dict(trainer.model.named_parameters())[name]
    want = param.detach().clone()
    for _ in range(3):
        trainer.train_step()
        want = 0.8 * want + 0.2 * param.detach()
    torch.testing.assert_close(trainer.ema[name], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(trainer.ema_state_dict()[name], trainer.ema[name])
    assert not torch.equal(trainer.ema[name], param.detach())

    straight = make_trainer(base, tmp_path / "b", steps=4, ema_decay=0.8)
    straight.train(progress=False)
    first = make_trainer(base, tmp_path / "c", steps=2, ema_decay=0.8)
    first.train(progress=False)
    resumed = make_trainer(base, tmp_path / "d", steps=4, ema_decay=0.8)
    resumed.load_checkpoint(tmp_path / "c")
    resumed.train(progress=False)
    assert all(torch.equal(resumed.ema[k], straight.ema[k]) for k in straight.ema)


def test_bad_ema_and_checkpointing_options(base, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        Trainer(model, lambda b, g: None, lambda s, m: None, TrainConfig(activation_checkpointing=True))
    for bad, message in ((dict(steps=0), "steps must be >= 1"), (dict(grad_clip=-1.0), "grad_clip must be >= 0")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_a_checkpoint_of_another_run_is_refused(base, tmp_path):  # noqa: F811
    first = make_trainer(base, tmp_path / "a", steps=1)
    first.meta = {"family": "fusion"}
    first.train(progress=False)
    other = make_trainer(base, tmp_path / "b", steps=2)
    other.meta = {"family": "metaquery"}
    with pytest.raises(ValueError, match="another run: family 'fusion'"):
        other.load_checkpoint(tmp_path / "a")


def test_a_resumed_run_logs_each_step_once(base, tmp_path):  # noqa: F811
    first = make_trainer(base, tmp_path, steps=3, checkpoint_every=2)
    first.train(progress=False)  # checkpoints at 2 and 3; the log has steps 1..3
    resumed = make_trainer(base, tmp_path, steps=3)
    resumed.load_checkpoint(tmp_path / "step_0000002")  # as if the run had died after step 2's checkpoint
    resumed.train(progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bf16_autocast_trains_and_runs_the_routed_gemms_in_bf16(base, tmp_path):  # noqa: F811
    fp32 = make_trainer(base, tmp_path / "fp32", steps=2, autocast="off")
    bf16 = make_trainer(base, tmp_path / "bf16", steps=2, autocast="bf16")
    seen = []
    layer = bf16.model.decoder.layers[0].attn.qkv
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    fp32.train(progress=False)
    bf16.train(progress=False)
    handle.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32
    for got, want in zip(bf16.history, fp32.history):
        assert abs(got["loss"] - want["loss"]) <= 2e-2 * abs(want["loss"])
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp8")
