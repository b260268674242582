"""`Prefetcher`: an iterator run in a background thread, a few items ahead, so that reading
the next step's rows overlaps the current step's compute."""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = range(3)
_POLL_S = 0.05


class Prefetcher(Generic[T]):
    """Iterate `iterable` in a background thread, keeping up to `depth` items ready.

    An exception the producer raises is raised by the consumer's `next()` at the point it
    would have come. `close()` (or leaving a `with` block) stops the producer and waits for
    its thread; dropping an unclosed Prefetcher stops the producer without waiting. The
    producer notices either after the item it is computing (an item is not interrupted);
    it then closes the iterator (a generator's `finally` runs in the producer thread).
    """

    def __init__(self, iterable: Iterable[T], depth: int = 2, *, name: str = "llamaray-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread must not reference self, or an abandoned Prefetcher could never be
        # collected (the running thread would keep it alive) and never stop.
        self._thread = threading.Thread(
            target=_produce, args=(iter(iterable), self._queue, self._stop), name=name, daemon=True
        )
        weakref.finalize(self, self._stop.set)
        self._thread.start()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                # Dead and empty: stopped by close() from another thread; nothing is coming.
                if not self._thread.is_alive() and self._queue.empty():
                    self._finish()
                    raise StopIteration from None
        if kind == _ITEM:
            return value
        self._finish()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, timeout: float | None = None) -> None:
        """Stop the producer and wait (up to `timeout` s) for its thread to end."""
        self._stop.set()
        self._finish(timeout)

    def _finish(self, timeout: float | None = None) -> None:
        self._done = True
        self._drain()  # frees the queued items; the producer is never blocked on a full queue
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _offer(q: queue.Queue, stop: threading.Event, message: tuple) -> bool:
    """Put `message`, waiting for room; False (not put) once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(message, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(it: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in it:
            if not _offer(q, stop, (_ITEM, item)):
                return
        _offer(q, stop, (_END, None))
    except BaseException as e:  # every failure, KeyboardInterrupt too, goes to the consumer
        _offer(q, stop, (_ERROR, e))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # nobody is left to report it to
                close()
