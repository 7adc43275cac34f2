"""The engine's subcommands of the ``mmfuse`` command line (one module each: train, prepare, generate)."""
if __name__ != "mmfuse.engine.commands":  # a bare-name import: an empty shadow, see mmfuse/__init__.py
    del __file__, __path__
else:
    import dataclasses

    from mmfuse.models.hf_io import CheckpointError

    def fail(command: str, exc: Exception) -> SystemExit:
        """The one-line error (exit code 1) a subcommand ends with on bad input."""
        return SystemExit(f"mmfuse {command}: {exc}")

    def describe_fields(cls: type, indent: str = "    ") -> str:
        """``name=default`` of every field of a config dataclass, wrapped for ``--help``."""
        items = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name == "hf_config":
                continue
            default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                else repr(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            items.append(f"{f.name}={default}")
        lines, line = [], indent
        for item in items:
            if len(line) + len(item) > 100:
                lines.append(line.rstrip())
                line = indent
            line += item + ", "
        lines.append(line.rstrip(", "))
        return "\n".join(lines)

    __all__ = ["CheckpointError", "describe_fields", "fail"]
