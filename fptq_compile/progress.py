"""Progress for multi-step work: one line naming the step that runs, with the time so far."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tqdm.auto import tqdm


class StepProgress:
    """Time the named steps of a job and, when enabled, show which one is running.

    ``seconds`` maps each finished step to its duration, whether or not the bar is shown.
    """

    def __init__(self, description: str, steps: Sequence[str], enabled: bool = True) -> None:
        self.seconds: dict[str, float] = {}
        self.enabled = enabled
        self._bar = tqdm(
            total=len(steps),
            desc=description,
            unit="step",
            bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}] {postfix}",
            disable=not enabled,
        )

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.set_postfix_str("done")
        self._bar.close()
