"""What every op shares: backend selection and argument checks, written once.

Every public op takes ``backend=None | "torch" | "triton"``:

* ``None`` picks Triton for CUDA tensors and the PyTorch reference otherwise (or what an enclosing
  ``with default_backend(...)`` says: how a whole model is run on one backend);
* ``"torch"`` always runs the PyTorch reference;
* ``"triton"`` runs the Triton kernel; on CPU tensors only when the process was started with
  ``TRITON_INTERPRET=1`` (how CI runs the kernels without a GPU).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Literal, Sequence

import torch

Backend = Literal["torch", "triton"]
_BACKENDS = ("torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend_name(backend: str | None) -> None:
    """``backend`` must be None, "torch" or "triton" (checked where it is given, before any work)."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")


# A plain module global, not a ContextVar: torch.compile traces (and guards on) globals but not
# ContextVar.get. The setting is process-wide, like torch's own backend flags.
_default_backend_override: str | None = None


@contextlib.contextmanager
def default_backend(backend: str | None) -> Iterator[None]:
    """Within the block, ops called with ``backend=None`` use ``backend`` ("torch" or "triton").

    This is how a whole model built from the ops runs on one backend, e.g. the Triton kernels on CPU
    through the interpreter in tests. ``None`` restores the automatic choice.
    """
    check_backend_name(backend)
    global _default_backend_override
    previous, _default_backend_override = _default_backend_override, backend
    try:
        yield
    finally:
        _default_backend_override = previous


def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> Backend:
    """Map the user's ``backend`` argument to ``"torch"`` or ``"triton"`` for these tensors."""
    check_backend_name(backend)
    on_cuda = False
    for t in tensors:  # a loop, not any(<generator>): decode steps call this in every op of every layer
        if t.is_cuda:
            on_cuda = True
            break
    if backend is None:
        backend = _default_backend_override
    if backend is None:
        return "triton" if on_cuda and not triton_interpreting() else "torch"
    if backend == "triton" and not on_cuda and not triton_interpreting():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: start the process with "
            "TRITON_INTERPRET=1 (or use backend='torch')"
        )
    return backend


def check_same_device(**tensors: torch.Tensor) -> None:
    """All named tensors on one device, else a ValueError naming the odd one out."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check one argument's type, rank, dtype and (partial) shape; ``None`` in ``shape`` is free."""
    # Plain loops, no generators: every op calls this several times, a decode step's ops included.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if shape is not None:
        actual = t.shape
        ok = len(actual) == len(shape)
        if ok:
            for want_size, size in zip(shape, actual):
                if want_size is not None and want_size != size:
                    ok = False
                    break
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(actual)}")
    return t


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype of the PyTorch backends: fp32 for fp16 / bf16 / fp32 inputs, fp64 if any is fp64."""
    for t in tensors:  # a loop, not any(<generator>): decode steps call this in every layer
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, minus the call when t already has it (a no-op ``.to`` costs ~0.8 us on CPU,
    several per op of a decode step)."""
    return t if t.dtype == dtype else t.to(dtype)


def dot_flags(dtype: torch.dtype) -> dict:
    """``UPCAST`` / ``DOT_PRECISION`` constexprs for kernels that call ``tl.dot`` on ``dtype`` operands.

    The interpreter's ``tl.dot`` on bf16 returns garbage, so interpreted kernels upcast operands to
    fp32 and multiply them exactly; on the GPU fp32 inputs stay exact (no tf32) too.
    """
    interpreting = triton_interpreting()
    return dict(UPCAST=interpreting, DOT_PRECISION="ieee" if dtype == torch.float32 or interpreting else "tf32")


def is_tracing() -> bool:
    """True under torch.compile/export tracing, where data-dependent checks must be skipped."""
    return torch.compiler.is_compiling()


def check_values_in_range(name: str, t: torch.Tensor, low: int, high: int, bounds: str) -> None:
    """Every element of the integer tensor ``t`` must lie in ``[low, high]`` (``bounds`` writes that
    range for the message, e.g. ``"[0, Lk=10]"``).

    On CPU a ValueError with the range found. On CUDA a device-side assertion instead
    (``torch._assert_async``, failing asynchronously): a host-side test would synchronise the GPU on
    every call, i.e. in every layer of an eager decode step. Skipped under torch.compile, where it
    is data-dependent.
    """
    if is_tracing() or t.numel() == 0:
        return
    if t.is_cuda:
        torch._assert_async(((t >= low) & (t <= high)).all(), f"{name} values must lie in {bounds}")
        return
    found_low, found_high = torch.aminmax(t)  # one reduction: this runs in every layer of a decode step
    found_low, found_high = found_low.item(), found_high.item()
    if found_low < low or found_high > high:
        raise ValueError(f"{name} values must lie in {bounds}, got [{found_low}, {found_high}]")


def tensor_metadata(*tensors: object) -> tuple | None:
    """All that argument checks read from these tensors (shape, dtype, device), as one hashable key
    for :class:`CheckMemo`; None if one of them is not a tensor (the checks then say which)."""
    meta = []
    for t in tensors:  # a loop, not a generator: every op of a decode step calls this
        if not isinstance(t, torch.Tensor):
            return None
        meta.append((t.shape, t.dtype, t.device))
    return tuple(meta)


class CheckMemo:
    """The key of the last arguments that passed an op's argument checks.

    Every layer of a forward, and every step of a decode, calls an op with arguments of the same
    shapes, dtypes and devices; their checks cost several microseconds of Python (rope on CPU: ~6 of
    a ~25 us decode call), so they run when that key changes, not on every call. A key holds what
    the checks read (:func:`tensor_metadata`, the resolved backend, the grad mode where it matters);
    a None key (an argument is not a tensor) always checks. Under tracing the checks always run: a
    graph checks once, when traced, and remembering would make it guard on the memo.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple | None = None

    def check(self, key: tuple | None, checks: Callable[..., None], *args) -> None:
        """``checks(*args)``, unless ``key`` is that of the last arguments that passed them."""
        if is_tracing():  # first: a graph must not guard on the memo
            checks(*args)
        elif key is None or key != self.last:
            checks(*args)
            self.last = key


class PairFacts:
    """What has been derived from the most recent pairs of tensors, kept while they are unchanged.

    Every layer of a forward (and its backward) passes the same interval tensors to attention and the
    same cos / sin tables to RoPE, so a fact derived from such a pair (a range check, a chunk plan, a
    rotation table) is derived once per batch or decode step, as a FlexAttention BlockMask is built
    once per batch.

    The tensors are held with their facts, so no other object can take their ids; an in-place change
    bumps their version counters and their facts start afresh. Inference tensors have no version
    counter: nothing is kept for them. The last ``kept`` pairs are remembered, so layers that
    alternate two masks (sliding-window and full attention) keep both.
    """

    def __init__(self, kept: int = 2):
        self.kept = kept
        self.entries: list[tuple] = []  # (a, b, versions, facts), most recent first

    def of(self, a: torch.Tensor, b: torch.Tensor) -> dict | None:
        """The facts dict of this pair (empty when new or changed), None for inference tensors."""
        # A pair, not *tensors: this runs in every layer of a decode step (~0.3 us; a general
        # n-tensor form costs twice that).
        for i, (held_a, held_b, versions, facts) in enumerate(self.entries):
            if held_a is a and held_b is b:  # held tensors: identity cannot be another object's
                if versions == (a._version, b._version):
                    return facts
                del self.entries[i]
                break
        if a.is_inference() or b.is_inference():
            return None
        facts: dict = {}
        self.entries.insert(0, (a, b, (a._version, b._version), facts))
        del self.entries[self.kept:]
        return facts

    def total(self, name: str) -> int:
        """The sum of one numeric fact over the kept pairs."""
        return sum(facts.get(name, 0) for *_, facts in self.entries)


def runs_body_directly(backend: str, *tensors: torch.Tensor) -> bool:
    """True when an op may call its PyTorch body itself instead of going through its custom op.

    That is the torch backend, outside torch.compile, with no gradient wanted (inference: a decode
    step, sampling). The custom-op wrapper is there for autograd and for graphs; at decode sizes
    its dispatch costs more than the arithmetic (CPU, rms_norm on (8, 256): 57 us through the op,
    15 us in the body). The routed ops and the diffusion pair run the op's own body (bit-identical
    results); mixed_attention with <= 16 queries takes its dense few-query form, equal to rounding.
    """
    return backend == "torch" and not is_tracing() and not _wants_grad(tensors)


def runs_plain_form(backend: str, *tensors: torch.Tensor) -> bool:
    """True for an inference call (no gradient wanted) of the torch backend, eager or under
    torch.compile: the elementwise ops (rms_norm, rope, swiglu) then run their plain PyTorch form.

    Eagerly that skips the custom op's dispatch, as :func:`runs_body_directly`. In a graph a custom
    op is opaque to Inductor, which can fuse the plain form with its neighbours: through the custom
    ops a compiled CPU decode step ran no faster than the eager one. Training graphs keep the ops
    (their backward is the op's own, not autograd's).
    """
    return backend == "torch" and not _wants_grad(tensors)


def _wants_grad(tensors: tuple[torch.Tensor, ...]) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(<generator>): ~1 us less in every op of a decode step
            if t.requires_grad:
                return True
    return False


def eager_autograd(op: Callable, body: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """How an op's public function calls the custom op ``op`` (defined from ``body``, with
    ``setup_context`` and ``backward`` as its autograd): the op itself where a graph needs it
    (:func:`is_tracing`), else a plain ``autograd.Function`` with the same body and backward, minus
    the dispatcher.

    The op's dispatch costs about 40 us per forward + backward on CPU, as much as a (32, 4, 64, 64)
    diffusion loss. ``backward`` sees ``ctx.eager = True`` and calls its backward body directly too
    (:func:`op_or_body`). Under ``torch.profiler`` the op itself runs inside the Function (autograd
    is off in a Function's forward), so profiles name the mmfuse ops as before.

    List-of-tensor arguments (the routed ops' experts) reach the Function flattened, so autograd
    tracks each tensor; ``body``, ``setup_context`` and ``backward`` still see the lists, and
    ``backward`` returns one list of gradients per list argument ([] or Nones for none). There,
    ``ctx.needs_input_grad`` indexes the flattened arguments: positions before the first list
    argument are the op's own.
    """

    def forward(ctx, *flat):
        layout, flat = flat[-1], flat[:-1]
        inputs = _unflatten(flat, layout)
        output = (op if _profiling() else body)(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager, ctx.layout = True, layout
        return output

    def flat_backward(ctx, *grads):
        return (*_flatten_grads(backward(ctx, *grads), ctx.layout), None)

    # ctx-style forward: a separate ``setup_context`` would make every apply bind its arguments through
    # ``inspect.signature`` (~15 us).
    function = type(f"Eager_{body.__name__}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(flat_backward)})

    def call(*inputs):
        if is_tracing():
            return op(*inputs)
        flat, layout = _flatten(inputs)
        return function.apply(*flat, layout)

    return call


def _flatten(values: Sequence) -> tuple[list, tuple]:
    """Arguments with list arguments spliced in, and the layout that undoes it (None: not a list, n:
    a list of n)."""
    flat, layout = [], []
    for value in values:
        if isinstance(value, list):
            flat.extend(value)
            layout.append(len(value))
        else:
            flat.append(value)
            layout.append(None)
    return flat, tuple(layout)


def _flatten_grads(grads: Sequence, layout: tuple) -> list:
    """A backward's gradients, one per argument, flattened like the arguments: an empty list stands
    for no gradient for any tensor of that list argument."""
    flat = []
    for grad, size in zip(grads, layout):
        if size is None:
            flat.append(grad)
        else:
            flat.extend(grad if grad else [None] * size)
    return flat


def _unflatten(flat: Sequence, layout: tuple) -> list:
    values, i = [], 0
    for size in layout:
        if size is None:
            values.append(flat[i])
            i += 1
        else:
            values.append(list(flat[i:i + size]))
            i += size
    return values


def op_or_body(ctx, op: Callable, body: Callable) -> Callable:
    """In a custom op's backward: the backward's own body when the forward ran eagerly
    (:func:`eager_autograd`) and no profiler is recording, else its custom op (a traced graph must
    hold the op, not its body)."""
    return body if getattr(ctx, "eager", False) and not _profiling() else op


def _profiling() -> bool:
    return torch.autograd.profiler._is_profiler_enabled
