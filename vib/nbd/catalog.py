"""Which exports a server offers: a fixed mapping, or a lookup function for exports that
come and go (the tap's protected disks)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping

from vib.nbd.export import Export

ExportLookup = Callable[[str], Export | Awaitable[Export | None] | None]
ExportSource = Mapping[str, Export] | ExportLookup


class ExportCatalog:
    """Resolves the names clients ask for. The empty name means `default_export`."""

    def __init__(self, exports: ExportSource, default_export: str | None = None) -> None:
        self._exports = exports
        self.default_export = default_export

    @property
    def can_list(self) -> bool:
        # A lookup function can answer for a name but cannot enumerate names.
        return isinstance(self._exports, Mapping)

    def names(self) -> list[str]:
        if isinstance(self._exports, Mapping):
            return list(self._exports)
        return []

    def canonical_name(self, name: str) -> str | None:
        if name:
            return name
        return self.default_export

    async def lookup(self, name: str) -> tuple[str, Export] | None:
        """(canonical name, export), or None when there is no such export."""
        canonical = self.canonical_name(name)
        if canonical is None:
            return None
        if isinstance(self._exports, Mapping):
            found: Export | None = self._exports.get(canonical)
        else:
            result = self._exports(canonical)
            found = await result if inspect.isawaitable(result) else result
        if found is None:
            return None
        return canonical, found
