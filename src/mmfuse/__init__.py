"""mmfuse: fast kernels and an engine for unified multimodal transformers.

The public ops live in :mod:`mmfuse.kernels`; see README.md for shapes.

The code folders ``kernels/ models/ engine/ bench/`` sit at the repository's top level and are
installed as ``mmfuse.kernels`` etc. With the repository root on ``sys.path`` (pytest, ``python -m``
run from the root) a library probing for a top-level package of one of those names finds the folder
under the bare name: transformers imports ``kernels`` at start-up, looking for the Hugging Face
kernel hub. Loading the code a second time would register every ``mmfuse::`` custom op again from a
second copy (seen as patched functions that never run and a corrupted operator registry), so each
folder's ``__init__`` turns itself into an empty shadow without ``__file__`` or ``__path__`` when
imported under a foreign name, which such probes treat as "not installed".
"""
__version__ = "0.1.0"

# Public functions that live in the code folders, loaded on first use so that ``import mmfuse`` stays cheap.
_LAZY = {"patch": "mmfuse.models.patch", "unpatch": "mmfuse.models.patch", "apply_mmfuse": "mmfuse.models.patch",
         "to_fusion": "mmfuse.models.patch"}


def __getattr__(name: str):
    """``mmfuse.patch``, ``mmfuse.unpatch``, ``mmfuse.apply_mmfuse``, ``mmfuse.to_fusion`` (see mmfuse.models.patch)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_transformers() -> None:
    """``import mmfuse`` makes ``attn_implementation="mmfuse"`` available to transformers."""
    try:
        from mmfuse.models.hf_integration import register
    except ImportError:  # transformers missing or too old: nothing to register with
        return
    register()


_register_with_transformers()
