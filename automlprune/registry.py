"""A small name -> object registry with metadata and lazy string entry points.

Modelled on timm/torchvision model registries: a duplicate name raises, an unknown
name raises a :class:`ConfigError` that lists the valid names, and an entry may be a
``"package.module:attribute"`` string imported only when first used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from automlprune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (models, datasets, criteria, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, tuple[str, str]] = {}

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

    def alias(self, old: str, new: str, why: str) -> None:
        """Keep the retired name ``old`` working for one release: it resolves to ``new`` with a
        FutureWarning that says ``why`` and to use ``new``; it is not listed in :meth:`names`."""
        self._aliases[old] = (new, why)

    def resolve(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or what a retired alias became, with a warning)."""
        if name in self._aliases and name not in self._entries:
            import warnings

            new, why = self._aliases[name]
            warnings.warn(f"{self.kind} '{name}' is deprecated and will be removed in the next release: {why}; use '{new}'",
                          FutureWarning, stacklevel=3)
            return new
        return name

    def unregister(self, name: str) -> None:
        """Remove ``name`` (plugins and tests that register temporary entries)."""
        self._entries.pop(name, None)
        self._metadata.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name`` (or by a retired alias, :meth:`alias`), importing it first if it is lazy."""
        name = self.resolve(name)
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
        return dict(self._metadata[self.resolve(name)])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def ordered_names(self) -> list[str]:
        """Names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases


def import_object(reference: str, search: tuple[Path, ...] = ()) -> Any:
    """The object ``package.module:name`` names (a user's model builder or dataset maker), imported
    with the current directory and ``search`` folders on the path; one sentence when it cannot be."""
    import sys

    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"python reference '{reference}' is not of the form package.module:name")
    folders = [str(Path.cwd()), *map(str, search)]
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: any error becomes one sentence
        raise ConfigError(f"cannot import {module_name} for '{reference}' ({type(exc).__name__}: {exc}); make it importable "
                          "from the current directory or the task file's folder") from None
    finally:
        for f in added:
            sys.path.remove(f)
    if not hasattr(module, attr):
        raise ConfigError(f"module {module_name} has no '{attr}' for '{reference}'")
    return getattr(module, attr)
