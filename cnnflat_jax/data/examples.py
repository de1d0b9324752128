"""A split's examples, whichever pipeline loaded them, and an epoch streamed from them.

``Arrays`` holds examples in host memory (the memory pipeline);
``array_records.Records`` reads them from a random-access source as they are
asked for (the grain pipeline). Both offer ``len``, ``take``, ``read`` and
``stream``, so the trainer meets one kind of object; ``stream`` gives an
iterator over an epoch's dispatches whose ``get_state()`` says where it stands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from cnnflat_jax.data import array_records

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


Examples = Arrays | array_records.Records
