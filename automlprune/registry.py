"""A small name -> object registry with metadata and lazy string entry points.

Modelled on timm/torchvision model registries: a duplicate name raises, an unknown
name raises a :class:`ConfigError` that lists the valid names, and an entry may be a
``"package.module:attribute"`` string imported only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from automlprune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (models, datasets, criteria, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | str | None = None, **metadata: Any) -> Callable[[T], T] | T | str:
        """Register ``obj`` under ``name`` (or use as a decorator when ``obj`` is None).

        ``obj`` may be a ``"module:attr"`` string for a lazy entry. A duplicate name raises
        ``ValueError`` (a programming error, not a user error).
        """
        if obj is None:
            def decorator(fn: T) -> T:
                self.register(name, fn, **metadata)
                return fn
            return decorator
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = obj
        self._metadata[name] = dict(metadata)
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (plugins and tests that register temporary entries)."""
        self._entries.pop(name, None)
        self._metadata.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``, importing it first if it is lazy."""
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}"
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def metadata(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._metadata[name])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def ordered_names(self) -> list[str]:
        """Names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
