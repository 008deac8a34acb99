"""Progress for long work: a tqdm bar on a terminal; in logs (stderr not a terminal) a concise
line at most every ``every`` seconds, and the last one at the end."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """``update(done, line, **postfix)`` after each unit of work; ``close()`` at the end."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True, every: float = 10.0) -> None:
        self.enabled, self.every = enabled, every
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=label, unit=unit, disable=not self.interactive, dynamic_ncols=True)
        self.last_print = time.perf_counter()
        self.pending: str | None = None

    def update(self, done: int, line: str, **postfix: str) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(**postfix)
        self.pending = line
        if self.enabled and not self.interactive and time.perf_counter() - self.last_print > self.every:
            self._print()

    def _print(self) -> None:
        print(self.pending, file=sys.stderr, flush=True)
        self.last_print = time.perf_counter()
        self.pending = None

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.interactive and self.pending is not None:
            self._print()
