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
import sys

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


_TRANSFORMERS_MODELS = "transformers.modeling_utils"  # where transformers' attention registry is used


def _register() -> None:
    try:
        from mmfuse.models.hf_integration import register
    except ImportError:  # transformers missing or too old: nothing to register with
        return
    register()


class _RegisterWhenTransformersLoads:
    """A meta-path finder that registers mmfuse's attention right after ``transformers.modeling_utils``
    is imported: ``import mmfuse`` stays cheap (no torch, no transformers), and every transformers
    model loaded later still finds ``attn_implementation="mmfuse"``."""

    def find_spec(self, name, path=None, target=None):
        if name != _TRANSFORMERS_MODELS:
            return None
        sys.meta_path.remove(self)  # find the real module through the other finders, once
        spec = next((s for s in (f.find_spec(name, path, target) for f in sys.meta_path if hasattr(f, "find_spec"))
                     if s is not None), None)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register_with_transformers() -> None:
    """``import mmfuse`` makes ``attn_implementation="mmfuse"`` available to transformers: now if
    transformers' models are loaded already, else as soon as they are."""
    if _TRANSFORMERS_MODELS in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenTransformersLoads())


_register_with_transformers()
