"""Shared argument docs: an alias documents each argument it takes with the text of the
transformation it wraps, so that every argument has one source and every alias its own list."""

import inspect
import re
from collections.abc import Callable

MARKER = "{inherited arguments}"


def arguments(fn: Callable) -> dict[str, str]:
    """The ``Args:`` entries of ``fn``'s Google-style docstring, ``{name: "name: text..."}``
    (continuation lines kept, dedented to the entry's level)."""
    lines = inspect.getdoc(fn).split("\n")
    entries: dict[str, list[str]] = {}
    name = None
    for line in lines[lines.index("Args:") + 1 :]:
        if line and not line.startswith(" "):  # the next section
            break
        match = re.match(r"^  (\w+): ", line)
        if match:
            name = match.group(1)
            entries[name] = [line[2:]]
        elif name is not None and line.strip():
            entries[name].append(line[2:])
    return {key: "\n".join(value) for key, value in entries.items()}


def inherit_arguments(source: Callable) -> Callable[[Callable], Callable]:
    """Decorator: the line ``{inherited arguments}`` of the ``Args:`` section becomes ``source``'s
    entries for the decorated function's parameters that its own docstring does not document,
    in the order of its signature."""

    def decorate(fn: Callable) -> Callable:
        if fn.__doc__ is None or f"      {MARKER}\n" not in fn.__doc__:
            raise ValueError(f"{fn.__name__}'s docstring has no line {MARKER!r} in its Args")
        entries = arguments(source)
        own = set(re.findall(r"^      (\w+): ", fn.__doc__, re.M))
        names = [p for p in inspect.signature(fn).parameters if p in entries and p not in own]
        text = "\n".join(
            "\n".join("      " + line if line else "" for line in entries[name].split("\n"))
            for name in names
        )
        fn.__doc__ = fn.__doc__.replace(f"      {MARKER}", text, 1)
        return fn

    return decorate
