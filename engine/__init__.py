"""Batching, training, KV cache, generation, sampling and the ``mmfuse`` command line."""
if __name__ != "mmfuse.engine":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    from .generate import generate, sample_next

    __all__ = ["generate", "sample_next"]
