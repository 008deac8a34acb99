"""Reading YAML config files safely, with one-sentence errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from automlprune.errors import ConfigError


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """Parse ``path`` with ``yaml.safe_load``; it must hold a mapping."""
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; check the path or run 'automlprune list' to see what ships")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} file {path} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping of keys to values")
    return data


def check_keys(data: Any, allowed: Iterable[str], where: str) -> None:
    """Raise a ConfigError naming the first unknown key of ``data`` and the allowed ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    allowed = set(allowed)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in {where}; allowed keys are: {', '.join(sorted(allowed))}")
