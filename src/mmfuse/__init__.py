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


def _register_with_transformers() -> None:
    """``import mmfuse`` makes ``attn_implementation="mmfuse"`` available to transformers."""
    try:
        from mmfuse.models.hf_integration import register
    except ImportError:  # transformers missing or too old: nothing to register with
        return
    register()


_register_with_transformers()
