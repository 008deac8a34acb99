"""The files of a run directory besides its study: where the own storage lives, atomic writes,
the lock workers take turns with, the cleanup of a directory a failed command created, and the
rule for which saved settings a resume must match."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Iterator

OWN_STORAGE = "study.db"
"""The run directory's own SQLite study: the storage of a run unless ``--storage`` names another."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of this process (unique name), so a
    crash or a concurrent writer never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:  # name the file the user knows, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock of a run directory between processes (``.lock``, ``flock``): held while a
    worker creates the storage or rewrites the run's config, so workers started together take turns."""
    with open(run_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_own_storage(url: str | None) -> bool:
    """Whether a stored storage URL is a run directory's own SQLite file (``None``, or the
    absolute ``sqlite:///.../study.db`` that runs before automlprune 0.1 recorded)."""
    return url is None or (url.startswith("sqlite:///") and Path(url[len("sqlite:///"):]).name == OWN_STORAGE)


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal storage URL points at (None for server databases)."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            return Path(url[len(prefix):].split("?", 1)[0])
    return None


@contextlib.contextmanager
def removed_if_left_empty(run_dir: Path, also: tuple[str, ...] = ()) -> Iterator[None]:
    """A run directory this command creates is removed again when the command fails before it
    stored anything (only the lock, the config, an empty own study.db with its write-ahead log and
    the files named in ``also`` in it): failed commands leave no empty run directories behind."""
    existed = run_dir.exists()
    try:
        yield
    except BaseException:
        if not existed and run_dir.is_dir() and _holds_nothing(run_dir, also):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _holds_nothing(run_dir: Path, also: tuple[str, ...] = ()) -> bool:
    if any(p.name not in (".lock", "config.json", "study.db", "study.db-wal", "study.db-shm", *also) for p in run_dir.iterdir()):
        return False
    db = run_dir / "study.db"
    if not db.is_file():
        return True
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute("select count(*) from trials").fetchone()[0] == 0
    except sqlite3.Error:
        return False


MEANING_KEYS = {"task": ("name", "model", "model_kwargs", "dataset", "dataset_options", "evaluation"),
                "space": None, "evaluator_seed": None}
"""Saved settings that change what a stored evaluation means (None: the whole value): a resumed
run must match them. Training, fine-tune and strategy options may differ between searches."""


def config_conflict(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first setting in which ``new`` differs from a run's saved ``old`` config in a way that
    would change what its stored evaluations mean, in words (None: they agree). Keys one side
    lacks (a setting added in a later version) are not compared."""
    def differ(where: str, a: Any, b: Any) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [k for k in a if k in b]:
                found = differ(f"{where}.{k}", a[k], b[k])
                if found:
                    return found
            return None
        theirs = "unset (the strategy's default)" if b is None else json.dumps(b, default=str)
        return None if a == b else f"{where} {json.dumps(a, default=str)}, not {theirs}"

    for key, fields_ in MEANING_KEYS.items():
        if key not in old or key not in new:
            continue
        a, b = old[key], new[key]
        if fields_ is not None:
            a, b = {k: a[k] for k in fields_ if k in a}, {k: b[k] for k in fields_ if k in b}
        found = differ(key, a, b)
        if found:
            return found
    old_ckpt, new_ckpt = old.get("task", {}).get("checkpoint"), new.get("task", {}).get("checkpoint")
    if old_ckpt and new_ckpt and Path(old_ckpt).resolve() != Path(new_ckpt).resolve():
        return f"the checkpoint {old_ckpt}, not {new_ckpt}"
    return None
