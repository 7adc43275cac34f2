"""Data, training, KV-cached generation, pipelines and the ``mmfuse`` subcommands.

``MMFusePipeline`` (:mod:`mmfuse.engine.pipeline`) loads on first use.
"""
if __name__ != "mmfuse.engine":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    from .generate import generate, sample_next

    __all__ = ["MMFusePipeline", "generate", "sample_next"]

    def __getattr__(name: str):
        if name == "MMFusePipeline":
            from .pipeline import MMFusePipeline

            return MMFusePipeline
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
