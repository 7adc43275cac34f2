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
        """``name: type = default`` of every field of a config dataclass (read from the class itself,
        so the help cannot drift from the schema), wrapped for ``--help``."""
        import json
        import typing

        hints = typing.get_type_hints(cls)
        items = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name == "hf_config":
                continue
            kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            kind = kind.replace("NoneType", "null")
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                items.append(f"{f.name}: {kind} (required)")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                items.append(f"{f.name}: {kind} = {json.dumps(default)}")
        lines, line = [], indent
        for item in items:
            if len(line) + len(item) > 104:
                lines.append(line.rstrip(", "))
                line = indent
            line += item + ", "
        lines.append(line.rstrip(", "))
        return "\n".join(lines)

    __all__ = ["CheckpointError", "describe_fields", "fail"]
