"""A split's examples, whichever pipeline loaded them, and an epoch streamed from them.

``Arrays`` holds examples in host memory (the memory pipeline);
``array_records.Records`` reads them from a random-access source as they are
asked for (the grain pipeline). Both offer ``len``, ``take``, ``read`` and
``stream`` (``Examples``), so the trainer meets one kind of
object; ``stream`` gives an iterator over an epoch's dispatches whose
``get_state()`` says where it stands. ``check_labels`` checks any source's labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

Dispatch = dict[str, np.ndarray]


class DispatchIterator(Iterator[Dispatch]):
    """An epoch's dispatches ``start, start + 1, ... count - 1``, each read when due.

    ``get_state()`` has the form of Grain's iterator states: the next dispatch.
    """

    def __init__(self, read_dispatch: Callable[[int], Dispatch], count: int, start: int):
        self._read_dispatch, self._count, self._next = read_dispatch, count, start

    def __next__(self) -> Dispatch:
        if self._next >= self._count:
            raise StopIteration
        dispatch = self._read_dispatch(self._next)
        self._next += 1
        return dispatch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}


class Examples(Protocol):
    """A split's examples, in memory or in a random-access source."""

    def __len__(self) -> int: ...

    def take(self, positions: np.ndarray | slice) -> Examples: ...

    def read(self, positions: np.ndarray | slice = ...) -> tuple[np.ndarray, np.ndarray]: ...

    def stream(
        self, read_dispatch: Callable[[int], Dispatch], count: int, start: int, state: dict | None
    ) -> Iterator[Dispatch]: ...


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Examples held in host memory: uint8 images ``(N, H, W, C)``, int32 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray | slice) -> Arrays:
        return Arrays(self.images[positions], self.labels[positions])

    def read(self, positions: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        return self.images[positions], self.labels[positions]

    def stream(
        self, read_dispatch: Callable[[int], Dispatch], count: int, start: int, state: dict | None
    ) -> DispatchIterator:
        """Dispatches from ``start`` on, each gathered when it is due (no reading
        ahead: memory is fast). ``state`` is implied by ``start``."""
        del state
        return DispatchIterator(read_dispatch, count, start)


def check_labels(
    labels: np.ndarray,
    num_classes: int,
    where: str,
    error: type[Exception],
    ids: np.ndarray | None = None,
    item: str = "index",
) -> None:
    """Raises ``error`` naming the first label outside ``[0, num_classes)``, the
    example's ``item`` (its index, or ``ids[i]``) and how many such labels there are."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        at = int(bad[0] if ids is None else ids[bad[0]])
        raise error(
            f"{where}: label {int(labels[bad[0]])} at {item} {at} is outside the "
            f"{num_classes} classes [0, {num_classes}) ({len(bad)} such labels); set "
            "--config.num_classes if the dataset has more classes"
        )
