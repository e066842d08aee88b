"""Telling an operator what is wrong with a plan file or a service's settings.

pydantic's own message repeats the input it refused, and a refused cluster block holds
the SASL password: these messages name each setting, where it comes from and what is
wrong with it, never its value.
"""

from __future__ import annotations

from pydantic import ValidationError


def describe(exc: ValidationError, *, env_prefix: str = "", nested_delimiter: str = "__") -> str:
    """One line per error: the setting's path, its environment variable when the
    settings come from one (`env_prefix`), and the reason."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        path = [str(part) for part in error["loc"]]
        where = ".".join(path) or "(the whole document)"
        if env_prefix and path:
            where += f" ({env_prefix}{nested_delimiter.join(path).upper()})"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
