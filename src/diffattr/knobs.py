"""Settings fields that carry their help and valid values (:func:`knob`), and which of a group's values enter a stage
key (:func:`keyed`). A leaf module: every settings dataclass (the schema's groups, the data package's, each method
family's, a plugin's) builds on it without importing anything else of the package."""

import dataclasses
from dataclasses import field
from typing import Any, Callable


def knob(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
         gt: float | None = None, lt: float | None = None, choices: Callable[[], Any] | None = None,
         pattern: str | None = None, free: str | None = None, factory: Callable[[], Any] | None = None,
         added: bool = False) -> Any:
    """A settings field with its help text and valid values (checked by ``diffattr.config`` before any job).

    ``min``/``max`` bound a number inclusively, ``gt``/``lt`` exclusively; ``choices`` returns the names of a
    registry; ``pattern`` is a regular expression the whole string must match; ``free`` says why every value of the
    type is valid (a test walks the schema and insists that each field has one of these). A list is checked item by
    item. ``added``: the field came after results existed, with a default that computes what they computed; at that
    default it enters no stage key and no checkpoint hash (:func:`keyed`), so those results stay valid."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices, "pattern": pattern,
            "free": free, "added": added}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def keyed(schema: type, values: dict) -> dict:
    """``values`` of a settings group (dataclass ``schema``) without the ``added`` fields that are at their default."""
    added = {f.name: f.default for f in dataclasses.fields(schema) if f.metadata.get("added")}
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}
