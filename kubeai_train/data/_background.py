"""Iterators run on a background thread, with a bounded queue between it and the consumer.

The pipeline overlaps its stages this way: source batches are decoded ahead of their
conversion (``read_ahead``), and batches are converted ahead of the trainer (``prefetch``).
Decoding and numpy work release the GIL, so on two cores the stages really run side by side.

Each call owns one daemon thread. The thread stops, and is joined, when the consuming
generator ends, fails, is closed or is garbage-collected; an exception in the thread is
re-raised in the consumer, unchanged, after every item produced before it. Memory is bounded
by the queue: at most ``maxsize`` items wait, plus one being put and the one being produced.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

__all__ = ["background"]

T = TypeVar("T")

_POLL = 0.1  # how often a producer blocked on a full queue checks whether to stop
_DONE = object()


class _Failure:
    """An exception of the producer, carried through the queue to the consumer."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def background(
    produce: Callable[[], Iterator[T]], maxsize: int, name: str, join_timeout: float = 30.0
) -> Generator[T, None, None]:
    """Iterate ``produce()`` on a daemon thread named ``name``, ``maxsize`` items ahead.

    Args:
        produce: called once, on the thread, at the first ``next()``; its iterator is closed
            on the thread when the consumer stops early.
        maxsize: items queued at most (>= 1).
        name: the thread's name.
        join_timeout: how long closing waits for a producer stuck in a call that does not
            return (a read hanging on the network); the daemon thread is then left to notice
            the stop at its next item. It only ever touches its own queue.

    Yields:
        The items of ``produce()``, in order.

    Raises:
        Whatever ``produce()`` raised, the same exception object, after the items before it.
    """
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
    q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            it = produce()
            try:
                for item in it:
                    if not put(item):
                        return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            put(_DONE)
        except BaseException as e:  # delivered to the consumer, after the good items
            put(_Failure(e))

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + join_timeout
        while t.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting to put
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
