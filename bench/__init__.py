"""Benchmarks: one script per op plus end-to-end training and sampling."""
if __name__ != "mmfuse.bench":  # found under a bare name via sys.path: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    pass
