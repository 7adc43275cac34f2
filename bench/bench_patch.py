"""A transformers Llama patched by ``mmfuse.patch`` vs the same model unpatched, side by side in one run.

Random weights (no download); the baseline is transformers' own modules with SDPA attention, the
other row the same weights after ``mmfuse.patch`` (RMSNorm, SwiGLU, RoPE, fused LM-head loss; the
attention stays SDPA). Two cases:

* "train_step": forward with labels + backward + ``AdamW.step``; the fused loss never holds the
  (B, L, V) logits, which is most of the peak-memory difference;
* "generate": greedy ``model.generate`` (KV cache, exactly ``new_tokens`` tokens), ``tokens_per_s``
  counting generated tokens; ``same_tokens`` says whether the patched model generated the baseline's.

The two models are timed in interleaved rounds (each round runs each once). Rows carry ms (the
median over rounds, with min and max), the peak extra memory, ``tokens_per_s`` and ``vs_mmfuse``
(baseline time / mmfuse time; > 1: mmfuse is faster); the train rows carry ``loss_diff`` (patched
loss minus the baseline's on the first step, a sanity check). CPU: fp32 and a small model (hidden
512, 4 layers, vocab 32000, batch 2 x 512 tokens; ``--quick`` shrinks it to finish in seconds);
GPU: bf16, a Llama-3.2-1B-shaped model.

    python -m mmfuse.bench.bench_patch [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmfuse.bench.common import add_ratio, append_results, bench_main, measure_interleaved, print_table, sync
from mmfuse.models.patch import patch


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> dict:
    """Model shape, batch and generation lengths for the device (``tiny``: toy shapes for tests)."""
    if tiny:
        model = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=256)
        return dict(model=model, batch=1, seq=32, prompt=8, new_tokens=4, gen_batch=1, dtype=torch.float32)
    if device.type == "cuda":  # Llama-3.2-1B widths
        model = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4 if quick else 16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
        return dict(model=model, batch=4 if quick else 8, seq=1024 if quick else 2048, prompt=128, new_tokens=64,
                    gen_batch=4, dtype=torch.bfloat16)
    if quick:
        model = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8000)
        return dict(model=model, batch=2, seq=256, prompt=16, new_tokens=8, gen_batch=1, dtype=torch.float32)
    model = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000)
    return dict(model=model, batch=2, seq=512, prompt=64, new_tokens=32, gen_batch=1, dtype=torch.float32)


def build_pair(s: dict, device: torch.device) -> dict[str, LlamaForCausalLM]:
    """The baseline and a patched copy with the same weights."""
    config = LlamaConfig(**s["model"], max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    base = LlamaForCausalLM(config).to(device=device, dtype=s["dtype"])
    ours = copy.deepcopy(base)
    patch(ours)
    return {"transformers": base, "mmfuse": ours}


def train_step(model: LlamaForCausalLM, s: dict, device: torch.device) -> tuple[Callable[[], object], float]:
    """The timed training step (forward with labels, backward, ``AdamW.step``) and its first loss."""
    vocab = s["model"]["vocab_size"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (s["batch"], s["seq"]), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : s["seq"] // 8] = -100  # a prompt without loss, as in instruction tuning
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = float(step())  # also allocates the optimizer state before memory is measured
    sync(device)
    return step, first_loss


def generate_step(model: LlamaForCausalLM, s: dict, device: torch.device) -> tuple[Callable[[], object], torch.Tensor]:
    """The timed greedy ``generate`` call and the tokens it returns."""
    vocab, n = s["model"]["vocab_size"], s["new_tokens"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, vocab, (s["gen_batch"], s["prompt"]), generator=gen).to(device)
    model.eval()
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  pad_token_id=0)

    def run_generate():
        with torch.no_grad():
            return model.generate(prompt, **kwargs)

    return run_generate, run_generate()


def _add_ratios(rows: list[dict]) -> None:
    add_ratio(rows, ("op",), "vs_mmfuse")
    ours = {r["op"]: r for r in rows if r["impl"] == "mmfuse"}
    for r in rows:
        if r["op"] == "train_step":
            r["loss_diff"] = ours["train_step"]["loss"] - r["loss"] if r["impl"] != "mmfuse" else 0.0


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    s = sizes(quick or tiny, device, tiny)
    rounds = 1 if tiny else 7 if device.type == "cpu" else 10
    m = s["model"]
    shape = f"D={m['hidden_size']} layers={m['num_hidden_layers']} V={m['vocab_size']}"
    pair = build_pair(s, device)
    # Both models in one process, timed in interleaved rounds (each round runs each once), so that
    # load from other processes falls on both alike: the patched model is a few percent either way.
    train = {impl: train_step(model, s, device) for impl, model in pair.items()}
    rows = [{"op": "train_step", "shape": f"{shape} B={s['batch']} L={s['seq']}", "mode": "fwd+bwd+adamw",
             "impl": impl, **measured, "loss": train[impl][1],
             "tokens_per_s": s["batch"] * s["seq"] / (measured["ms"] * 1e-3)}
            for impl, measured in measure_interleaved({k: v[0] for k, v in train.items()}, device, rounds).items()]
    del train  # the optimizer states
    generate = {impl: generate_step(model, s, device) for impl, model in pair.items()}
    gen_shape = f"{shape} B={s['gen_batch']} prompt={s['prompt']} new={s['new_tokens']}"
    for impl, measured in measure_interleaved({k: v[0] for k, v in generate.items()}, device, rounds).items():
        rows.append({"op": "generate", "shape": gen_shape, "mode": "greedy", "impl": impl, **measured,
                     "tokens_per_s": s["gen_batch"] * s["new_tokens"] / (measured["ms"] * 1e-3),
                     "same_tokens": bool(torch.equal(generate["mmfuse"][1], generate[impl][1]))})
    _add_ratios(rows)
    print_table(rows, ["op", "shape", "impl", "ms", "vs_mmfuse", "peak_mib", "tokens_per_s", "loss_diff",
                       "same_tokens"])
    config = dict(quick=quick, tiny=tiny, dtype=str(s["dtype"]), rounds=rounds,
                  **{k: v for k, v in s.items() if k != "dtype"})
    append_results("patch", device, config, rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="a smaller model (seconds on a CPU)")


if __name__ == "__main__":
    main()
