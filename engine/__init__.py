"""Batching, training, KV cache, generation, sampling and the ``mmfuse`` command line."""
