"""The training baselines do the same work as the mmfuse models; the training and sampling benchmarks
return and record rows of the agreed schema (tiny shapes, CPU, fp32)."""
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmfuse.bench import baselines, bench_sampling, bench_training
from tests.helpers import rel_err

CPU = torch.device("cpu")
TINY = bench_training.sizes(True, CPU, tiny=True)
TINY_PROMPTS = bench_sampling.sizes(True, CPU, tiny=True).image_prompt_lens


@pytest.fixture(autouse=True)
def one_thread():
    """These tests check values and rows, not speed: one thread keeps tiny shapes quick when other
    processes hold the cores (tiny ops on two contended threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss_and_grads(case, impl: str):
    case.model.zero_grad(set_to_none=True)
    objective = case.losses[impl](case.batch, torch.Generator().manual_seed(3))
    objective.total.backward()
    grads = {n: p.grad.clone() for n, p in case.model.named_parameters() if p.grad is not None}
    return objective, grads


@pytest.mark.parametrize("family", bench_training.FAMILIES)
def test_baseline_gives_the_loss_and_gradients_of_mmfuse(family):
    case = bench_training.CASES[family](TINY, CPU)
    ours, our_grads = _loss_and_grads(case, "mmfuse")
    base, base_grads = _loss_and_grads(case, "baseline")
    assert set(base.components) == set(ours.components)
    for name in ours.components:
        assert rel_err(base.components[name], ours.components[name]) <= 1e-4, name
    assert rel_err(base.total, ours.total) <= 1e-4
    assert all(bool(v > 0) for v in ours.components.values())  # every term carries signal
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(base_grads) and set(our_grads) <= trainable
    # Every trainable part the loss reaches gets a gradient (MetaMorph's SD projection is unused in training).
    assert trainable - set(our_grads) <= {"sd_proj.weight", "sd_proj.bias"}
    frozen = {n for n, p in case.model.named_parameters() if not p.requires_grad}
    assert frozen, "each family freezes something (text expert, SigLIP tower, LLM)"
    # Some gradients are 0 in exact arithmetic (e.g. a key bias, which softmax ignores): their error is
    # measured against 1e-4 of the typical gradient instead of their own rounding noise.
    total = math.sqrt(sum(float(g.double().square().sum()) for g in our_grads.values()))
    floor = 1e-4 * total / math.sqrt(len(our_grads))
    for name, want in our_grads.items():
        err = float((base_grads[name].double() - want.double()).norm()) / max(float(want.double().norm()), floor)
        assert err <= 1e-4, (name, err)


def test_sdpa_mask_is_the_interval_mask_and_padding_sees_itself():
    kv_start = torch.tensor([[0, 0, 0, 0, 0]], dtype=torch.int32)
    kv_end = torch.tensor([[1, 3, 3, 4, 0]], dtype=torch.int32)  # causal, a 2-token span, causal, padding
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]],
                        dtype=torch.bool)
    assert torch.equal(baselines.sdpa_mask(kv_start, kv_end), want[None, None])


def test_stack_flops_count_what_the_eager_layers_run():
    """Forward + backward of two layers (every weight trainable, full attention) through the math SDPA
    backend, whose matmuls FlopCounterMode sees, equals the analytic count exactly."""
    decoder = bench_training.random_decoder(TINY.decoder, CPU)
    B, L = 2, 12
    x = torch.randn(B, L, decoder.config.dim, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hidden = baselines.decoder_forward(decoder, x, None, None)
        hidden.square().sum().backward()
    want = bench_training.stack_flops(decoder.config, B * L, B * L * L, B * L)
    assert counter.get_total_flops() == want


REQUIRED = ("impl", "ms", "ms_min", "ms_max")



def _check_timed(row: dict) -> None:
    for key in REQUIRED:
        assert key in row, key
    assert all(math.isfinite(row[k]) for k in ("ms", "ms_min", "ms_max"))
    assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"]
    assert row["vs_mmfuse"] is not None and math.isfinite(row["vs_mmfuse"])


def _recorded(tmp_path, name: str, rows: list[dict]) -> dict:
    runs = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(runs) == 1 and runs[0]["rows"] == rows and runs[0]["device_type"] == "cpu"
    return runs[0]


def test_training_run_returns_and_records_schema_rows(tmp_path):
    rows = bench_training.run(True, CPU, str(tmp_path), tiny=True)
    families = _recorded(tmp_path, "training", rows)["config"]["families"]
    assert {(r["family"], r["impl"]) for r in rows} == {(f, i) for f in bench_training.FAMILIES
                                                       for i in ("mmfuse", "baseline")}
    for r in rows:
        _check_timed(r)
        assert r["size"] == "tiny" and r["params"] > r["trainable_params"] > 0
        assert r["seq_len"] > 0 and r["batch"] > 0 and r["peak_mib"] is not None
        work = families[r["family"]]
        assert r["tokens_per_s"] == pytest.approx(work["tokens"] / (r["ms"] * 1e-3))
        assert r["images_per_s"] == pytest.approx(work["images"] / (r["ms"] * 1e-3))
        assert "mfu" not in r  # MFU only on CUDA
        if r["impl"] == "mmfuse":
            assert r["vs_mmfuse"] == 1.0


def test_sampling_run_returns_and_records_schema_rows(tmp_path):
    rows = bench_sampling.run(True, CPU, str(tmp_path), tiny=True)
    decode = [r for r in rows if r["kind"] == "decode"]
    image = [r for r in rows if r["kind"] == "image"]
    assert {(r["impl"], r["batch"]) for r in decode} == {(i, b) for i in ("mmfuse", "transformers") for b in (1, 2)}
    assert {(r["impl"], r["prompt_len"], r["cfg"]) for r in image} == {
        (i, p, c) for i in ("cached", "recompute") for p in TINY_PROMPTS for c in (False, True)}
    for r in rows:
        _check_timed(r)
    for r in decode:
        assert r["tokens_match"] is True  # fp32: greedy decoding agrees token for token
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] * r["batch"] / (r["ms"] * 1e-3))
    for r in image:
        assert r["max_diff"] <= 1e-4  # both samplers compute the same image
        assert r["ms_per_image"] == pytest.approx(r["ms"] / r["batch"])
    _recorded(tmp_path, "sampling", rows)



def test_decode_bytes_count_every_weight_once(tmp_path):
    """With an empty cache a decode step reads every weight of a tied Llama once: its parameter count."""
    fields = bench_sampling.sizes(True, CPU, tiny=True).decoder
    bench_sampling.save_random_llama(fields, str(tmp_path), torch.float32)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert bench_sampling.decode_bytes_per_step(fields, 1, 0, 0, 1) == sum(p.numel() for p in hf.parameters())
    kv_per_token = 2 * fields["num_layers"] * fields["num_kv_heads"] * fields["head_dim"]
    assert bench_sampling.decode_bytes_per_step(fields, 3, 5, 4, 2) == 2 * (
        sum(p.numel() for p in hf.parameters()) + 3 * 7 * kv_per_token)
