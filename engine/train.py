"""The training loop: AdamW, warmup + cosine schedule, accumulation, clipping, checkpoints, exact resume.

Batches come from ``get_batch(step, micro)``, a pure function of the step: together with a per-step
noise generator (seeded from the step) this makes a resumed run reproduce the uninterrupted one's
losses exactly. Checkpoints are safetensors only (model, optimizer, RNG) plus a JSON of scalars,
written to a temporary folder and renamed into place, so a crash mid-write never corrupts the latest.

Under ``torchrun`` (after :func:`init_distributed`) ``get_batch`` returns this rank's shard
(:func:`rank_and_world`), gradients are averaged across ranks, the logged losses are the all-reduced
means, and rank 0 alone writes checkpoints and logs. ``TrainConfig.data_parallel`` picks how:
``"ddp"`` (``DistributedDataParallel``: every rank holds all weights) or ``"fsdp"`` (FSDP2
``fully_shard`` on every block the caller names -- a family's ``blocks``, e.g. its decoder layers --
and the root: weights, gradients and optimizer state sharded across ranks; checkpoints gather them, so
they are the same files either way). Activation checkpointing recomputes those same blocks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mmfuse._progress import progress_bar
from mmfuse.engine.atomic import atomic_file, atomic_folder
from mmfuse.kernels.objectives import Objective

LossFn = Callable[[object, torch.Generator], Objective]  # (batch, noise generator) -> objective


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (when out_dir is set)
    out_dir: str | None = None
    activation_checkpointing: bool = False  # recompute the model's blocks in the backward (less memory)
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the trainable weights
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16": always; "off"
    data_parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2, sharded)

    def __post_init__(self):
        for name, ok, rule in (("steps", self.steps >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
                               ("lr", self.lr > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                               ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
                               ("log_every", self.log_every >= 1, ">= 1"), ("grad_clip", self.grad_clip >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"bad training config: {name} must be {rule}, got {getattr(self, name)}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"bad training config: autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.data_parallel not in ("ddp", "fsdp"):
            raise ValueError(f"bad training config: data_parallel must be 'ddp' or 'fsdp', got {self.data_parallel!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"bad training config: ema_decay must lie in [0, 1), got {self.ema_decay}")


def init_distributed() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU); returns (rank, world)."""
    if "RANK" in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LossModule(torch.nn.Module):
    """Makes the loss function a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, loss_fn: "LossFn"):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, generator):
        objective = self.loss_fn(batch, generator)
        return objective.total, objective.components


def _report_line(record: dict, steps: int) -> str:
    """One line of a run's progress: step, losses, run-average throughput."""
    losses = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "lr", "grad_norm", "tokens",
                                                                            "images") and not k.endswith("_per_s")
                       and "/" not in k)  # per-source counts stay in the log file
    rates = "  ".join(f"{k.removesuffix('_per_s')}/s {v:.0f}" for k, v in record.items() if k.endswith("_per_s"))
    return f"step {record['step']}/{steps}  {losses}  {rates}"


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, c: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    on_cuda = params[0].is_cuda
    # fused AdamW: one kernel for all parameters on GPU; foreach is the fast path on CPU.
    return torch.optim.AdamW(params, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay,
                             fused=on_cuda or None, foreach=None if on_cuda else True)


class Trainer:
    """Runs ``config.steps`` optimizer steps of ``loss_fn(get_batch(step, micro), generator)``.

    Args:
        blocks: the model's repeated blocks (a family's ``blocks(model)``): FSDP2 units, and what
            activation checkpointing recomputes.
        meta: what the run is (e.g. its family), written into every checkpoint's ``trainer.json``.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, get_batch: Callable[[int, int], object],
                 config: TrainConfig, count: Callable[[object], dict[str, int]] | None = None,
                 blocks: list[torch.nn.Module] | None = None, meta: dict | None = None):
        self.model, self.loss_fn, self.get_batch, self.config = model, loss_fn, get_batch, config
        self.count = count or (lambda batch: {})
        self.meta = dict(meta or {})
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.rank, self.world = rank_and_world()
        self.out_dir = Path(config.out_dir) if config.out_dir and self.rank == 0 else None
        blocks = list(blocks or [])
        if config.activation_checkpointing:
            if not blocks:
                raise ValueError("activation_checkpointing: give the model's blocks to recompute (blocks=...)")
            for block in blocks:
                _checkpoint_forward(block)
        loss_module = _LossModule(model, lambda batch, generator: self.loss_fn(batch, generator))
        self.sharded = self.world > 1 and config.data_parallel == "fsdp"
        if self.sharded:
            _fully_shard(loss_module, blocks)
            self._forward = loss_module
        elif self.world > 1:
            self._forward = torch.nn.parallel.DistributedDataParallel(loss_module)
        else:
            self._forward = loss_module
        # After sharding: under FSDP the optimizer and the EMA hold this rank's shards only.
        self.optimizer = make_optimizer(model, config)
        # EMA of the trainable weights, in fp32 (name -> tensor); saved with the checkpoint.
        self.ema = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad} \
            if config.ema_decay > 0 else {}

    def _noise_generator(self, step: int, micro: int) -> torch.Generator:
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(self.config.seed * 1_000_003 + step * 997 + micro)

    def train_step(self) -> dict[str, float]:
        c, step = self.config, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, c)
        self.model.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for micro in range(c.grad_accum):
            batch = self.get_batch(step, micro)
            last = micro == c.grad_accum - 1
            with self._gradient_sync(last):
                with self._autocast():
                    total, components = self._forward(batch, self._noise_generator(step, micro))
                values = self._global_mean(torch.stack([total.detach(), *(v.detach() for v in components.values())]))
                if not torch.isfinite(values).all():  # all ranks see the same values, so all stop together
                    parts = dict(zip(components, values[1:].tolist()))
                    raise FloatingPointError(f"non-finite loss at step {step} (micro-batch {micro}): "
                                             f"total={float(values[0])}, components={parts}")
                (total / c.grad_accum).backward()
            for name, value in zip(["loss", *components], values.tolist()):
                totals[name] = totals.get(name, 0.0) + value / c.grad_accum
            for name, n in self.count(batch).items():
                counts[name] = counts.get(name, 0) + n
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], c.grad_clip)
            totals["grad_norm"] = float(_full(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        record = {"step": self.step, "lr": lr_at(step, c), **totals, **counts}
        self.history.append(record)
        return record

    def _gradient_sync(self, last: bool):
        """Accumulating micro-batches skip the gradient all-reduce / reduce-scatter; the last one runs it."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            self._forward.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self._forward.no_sync()

    def _autocast(self):
        device = next(self.model.parameters()).device.type
        mode = self.config.autocast
        enabled = mode == "bf16" or (mode == "auto" and device == "cuda")
        return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if not self.ema:
            return
        params = dict(self.model.named_parameters())
        for name, avg in self.ema.items():
            avg.lerp_(params[name].detach().float(), 1.0 - self.config.ema_decay)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state on every rank (under FSDP a collective: call it on all ranks)."""
        return {k: _full(v) for k, v in self.model.state_dict().items()}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with every trainable weight replaced by its EMA (in the weight's dtype);
        under FSDP a collective like :meth:`full_state_dict`."""
        state = self.full_state_dict()
        state.update({n: _full(avg).to(state[n].dtype) for n, avg in self.ema.items()})
        return state

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def train(self, progress: bool | None = None) -> list[dict[str, float]]:
        """Run to ``config.steps``. ``progress``: a progress bar (None: when stderr is a terminal; when
        it is not, a line of losses and throughput every tenth of the run instead)."""
        c = self.config
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._rewrite_log()
        log = open(self.out_dir / "train_log.jsonl", "a") if self.out_dir else None
        bar = progress_bar(total=c.steps, initial=self.step, progress=progress if self.rank == 0 else False, desc="train")
        report_every = max(1, c.steps // 10) if progress is None and bar.disable and self.rank == 0 else 0
        t0, seen = time.perf_counter(), {}
        try:
            while self.step < c.steps:
                record = self.train_step()
                for k in ("tokens", "images"):
                    seen[k] = seen.get(k, 0) + int(record.get(k, 0))
                elapsed = time.perf_counter() - t0
                record.update({f"{k}_per_s": v / elapsed for k, v in seen.items()})
                if log:
                    log.write(json.dumps(record) + "\n")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                     if k not in ("step", "tokens", "images") and "/" not in k})  # not per-source
                bar.update(1)
                if report_every and (self.step % report_every == 0 or self.step == c.steps):
                    print(_report_line(record, c.steps), flush=True)
                if c.out_dir and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log:
                log.close()
        if c.out_dir:
            self.save_checkpoint()
        return self.history

    def _rewrite_log(self) -> None:
        """The log holds exactly the steps done so far: a resumed run drops the lines written after its
        checkpoint (they are redone), so the log never repeats a step."""
        log = self.out_dir / "train_log.jsonl"
        if not self.step and not log.exists():
            return
        with atomic_file(log) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, out_dir: str | os.PathLike | None = None) -> Path:
        """Write ``step_XXXXXXX/`` atomically and point ``latest`` at it (rank 0; others wait); returns its path."""
        root = Path(out_dir or self.config.out_dir)
        # Under FSDP every rank takes part in gathering the shards; rank 0 alone writes.
        if self.sharded or self.rank == 0:
            tensors = {"model": _cpu(self.full_state_dict()), "ema": _cpu({k: _full(v) for k, v in self.ema.items()})}
            tensors["optimizer"], optim_meta = _flatten_optimizer(self.optimizer)
        if self.rank != 0:
            dist.barrier()
            return root / f"step_{self.step:07d}"
        path = self._write_checkpoint(root, tensors, optim_meta)
        if self.world > 1:
            dist.barrier()
        return path

    def _write_checkpoint(self, root: Path, tensors: dict[str, dict[str, torch.Tensor]], optim_meta: dict) -> Path:
        final = root / f"step_{self.step:07d}"
        with atomic_folder(final) as tmp:
            save_file(tensors["model"], str(tmp / "model.safetensors"))
            save_file(tensors["optimizer"], str(tmp / "optimizer.safetensors"))
            save_file({"cpu_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            if self.ema:
                save_file(tensors["ema"], str(tmp / "ema.safetensors"))
            meta = {"step": self.step, "config": asdict(self.config), "optimizer": optim_meta,
                    "history": self.history, **self.meta}
            (tmp / "trainer.json").write_text(json.dumps(meta))
        with atomic_file(root / "latest") as pointer:
            pointer.write_text(final.name)
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from a ``step_*`` folder, or from the one a run folder's ``latest`` names."""
        path = Path(path)
        if (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {path} (expected trainer.json and safetensors files)")
        meta = json.loads((path / "trainer.json").read_text())
        differ = {k: (meta.get(k), v) for k, v in self.meta.items() if meta.get(k) != v}
        if differ:
            detail = ", ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"the checkpoint at {path} is of another run: {detail}")
        device = next(self.model.parameters()).device
        model_state = load_file(str(path / "model.safetensors"), device=str(device))
        current = self.model.state_dict()
        self.model.load_state_dict({k: _shard_like(v, current.get(k)) for k, v in model_state.items()}, strict=True)
        _restore_optimizer(self.optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)),
                           meta["optimizer"])
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu_rng"])
        if self.ema:
            if not (path / "ema.safetensors").is_file():
                raise FileNotFoundError(f"{path} has no ema.safetensors but this run keeps an EMA (ema_decay > 0)")
            ema = load_file(str(path / "ema.safetensors"), device=str(device))
            self.ema = {k: _shard_like(v.float(), self.ema.get(k)) for k, v in ema.items()}
        self.step, self.history = meta["step"], meta["history"]


# ---------------------------------------------------------------------------------------------- FSDP2


def _fully_shard(loss_module: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """FSDP2: one unit per block (gathered just before it runs, freed after), then the root.

    The root is the loss module, not the model: the loss calls ``training_loss`` rather than the
    model's ``forward``, so only the root's hooks see every parameter outside the blocks gathered.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(loss_module)


def _checkpoint_forward(block: torch.nn.Module) -> None:
    """Make ``block`` recompute its activations in the backward (only while gradients are being taken:
    inference runs it as it is). The state dict and parameters stay as they are."""
    import torch.utils.checkpoint

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = checkpointed


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP-sharded one (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(value: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """``value`` (a whole tensor from a checkpoint) sharded as ``reference`` is, when that is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return value
    return distribute_tensor(value.to(reference.dtype), reference.device_mesh, reference.placements)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-friendly tensors plus JSON metadata (no pickle)."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):  # under FSDP gathered (every rank, the same order)
                tensors[f"{pid}.{name}"] = _full(value).detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]  # the state dict's numbering
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        param = params[int(pid)]
        if isinstance(value, torch.Tensor) and value.shape == param.shape:  # moments, sharded like the weight
            value = _shard_like(value, param)
        state.setdefault(int(pid), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
