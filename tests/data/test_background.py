"""The background iterator behind prefetch and read-ahead: order, bounds, errors, shutdown."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest

from kubeai_train.data._background import background


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_items_in_order_and_the_queue_bounds_the_producer() -> None:
    made: list[int] = []

    def produce() -> Iterator[int]:
        for i in range(100):
            made.append(i)
            yield i

    it = background(produce, 3, "bg-order")
    assert next(it) == 0
    deadline = time.monotonic() + 30
    while len(made) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one taken, 3 queued, one made and waiting to be put: no more
    assert len(made) == 5, made
    assert list(it) == list(range(1, 100))
    assert not _alive("bg-order")


def test_an_error_arrives_after_the_good_items_as_the_same_object() -> None:
    boom = ValueError("row 7 is bad")

    def produce() -> Iterator[int]:
        yield from range(7)
        raise boom

    got: list[int] = []
    with pytest.raises(ValueError) as ei:
        for i in background(produce, 2, "bg-error"):
            got.append(i)
    assert ei.value is boom and got == list(range(7))
    assert not _alive("bg-error")


@pytest.mark.parametrize("how", ["close", "garbage"])
def test_stopping_early_closes_the_producer_on_its_thread_and_joins_it(how: str) -> None:
    closed: list[str] = []

    def produce() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(threading.current_thread().name)

    it = background(produce, 2, "bg-stop")
    assert [next(it), next(it)] == [0, 1]
    if how == "close":
        it.close()
    else:
        del it
        gc.collect()
    # joined before close() (or the collection) returned
    assert closed == ["bg-stop"] and not _alive("bg-stop")


def test_a_producer_stuck_in_a_call_is_given_up_after_the_join_timeout() -> None:
    release = threading.Event()

    def produce() -> Iterator[int]:
        yield 0
        release.wait(30)  # a read hanging on the network
        yield 1

    it = background(produce, 1, "bg-stuck", join_timeout=0.3)
    assert next(it) == 0
    t0 = time.monotonic()
    it.close()
    assert time.monotonic() - t0 < 5
    release.set()  # the daemon thread then notices the stop at its next item
    deadline = time.monotonic() + 30
    while _alive("bg-stuck") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive("bg-stuck")


def test_maxsize_is_validated() -> None:
    with pytest.raises(ValueError, match="maxsize must be >= 1, got 0"):
        next(background(lambda: iter([1]), 0, "bg-bad"))
