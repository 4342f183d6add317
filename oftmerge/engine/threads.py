"""Worker threads of the streaming engine, and the torch thread count of a run.

* :class:`OneThread`: one worker thread and its futures, in submission order.
* :class:`Prefetch`: ``load(item)`` for the next items in a worker thread while the caller works on
  the current one (file reads, decoding and torch release the GIL, so the two overlap); at most
  ``ahead`` results are held.
* :func:`torch_threads`: run with ``n`` torch intra-op threads, restored afterwards.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, Self, TypeVar

import torch

__all__ = ["OneThread", "Prefetch", "torch_threads"]

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (restored afterwards); None leaves torch's setting."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OneThread:
    """One worker thread and its futures, in submission order; leaving the ``with`` cancels what has not started."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, name)
        self._pending: collections.deque[tuple[Any, Future[Any]]] = collections.deque()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


class Prefetch(OneThread, Generic[T, R]):
    """Iterate ``(item, load(item))`` in order, loading up to ``ahead`` items ahead in a worker thread.

    A loading error is raised by the iteration that reaches its item.
    """

    def __init__(self, load: Callable[[T], R], items: Iterable[T], *, ahead: int = 2, name: str = "oftmerge-read"):
        super().__init__(name)
        self._load = load
        self._items = iter(items)
        self._ahead = ahead

    def _fill(self) -> None:
        while len(self._pending) < self._ahead and (item := next(self._items, _END)) is not _END:
            self._pending.append((item, self._pool.submit(self._load, item)))

    def __iter__(self) -> Iterator[tuple[T, R]]:
        self._fill()
        while self._pending:
            item, future = self._pending.popleft()
            self._fill()
            yield item, future.result()


_END: Any = object()
