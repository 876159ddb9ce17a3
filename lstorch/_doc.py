"""One docstring source for a function and its ``nn.Module``.

A module's constructor takes the keywords of its function, with the same meaning. Their
descriptions are written once, in the function's ``Args:`` section, and :func:`module_args`
copies the entries of the constructor's keywords into the module's docstring (before its
``Shape:`` section, as ``torch.nn`` losses order them), so the two cannot drift. The module's
own docstring says what differs (defaults, where an option goes) and the shapes ``forward``
takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

_SECTION_INDENT = " " * 4


def args_entries(doc: str) -> dict[str, list[str]]:
    """The entries of a Google-style ``Args:`` section (indented by 4, entries by 6): each
    argument's name and its lines, continuation lines included."""
    entries: dict[str, list[str]] = {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return entries
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section (or prose): the end
            break
        if line.startswith("  ") and not line.startswith("    ") and ":" in line:
            name = line.strip().split(":", 1)[0]
            entries[name] = []
        if name is not None and line:
            entries[name].append(_SECTION_INDENT + line)
    return entries


def module_args(function: Callable) -> Callable[[type], type]:
    """A class decorator: the module's docstring gains an ``Args:`` section with the entries of
    ``function``'s docstring for the module's constructor arguments, in the constructor's order,
    before its ``Shape:`` section (at the end when it has none)."""

    def decorate(module: type) -> type:
        entries = args_entries(function.__doc__ or "")
        names = [n for n in inspect.signature(module.__init__).parameters if n != "self"]
        missing = [name for name in names if name not in entries]
        if missing:
            raise AssertionError(f"{function.__name__}'s docstring documents no {missing}")
        section = [_SECTION_INDENT + "Args:"] + [line for n in names for line in entries[n]]
        lines = (module.__doc__ or "").rstrip().splitlines()
        shape = next((i for i, line in enumerate(lines) if line.strip() == "Shape:"), len(lines))
        module.__doc__ = "\n".join([*lines[:shape], *section, "", *lines[shape:]]).rstrip() + "\n"
        return module

    return decorate
