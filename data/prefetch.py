"""Run a generator in a background thread with a bounded queue (batch assembly + pinning off the
training thread). Closing the consumer stops the thread; an exception in the thread is re-raised."""
from __future__ import annotations

import queue
import threading
from typing import Iterator

_DONE = object()


def threaded(gen: Iterator, depth: int) -> Iterator:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in gen:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()

    t = threading.Thread(target=run, name="mnemo-data", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
