"""Worker threads for blocking export calls, with batched completion delivery.

Cheaper than ``ThreadPoolExecutor`` + one ``call_soon_threadsafe`` per request: jobs travel on a
C ``SimpleQueue`` with no Future objects, and completions are appended to a per-connection deque
that wakes the event loop once per batch instead of once per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

#: handler(tag, ok, result_or_exception), run on the event loop.
Handler = Callable[[Any, bool, Any], None]


class CompletionSink:
    """Collects results from worker threads and hands them to ``handler`` on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Handler,
        around: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> None:
        """``around`` = (before, after) is called around each batch (e.g. cork/uncork)."""
        self._loop = loop
        self._handler = handler
        self._around = around
        self._done: deque[tuple[Any, bool, Any]] = deque()
        self._scheduled = False

    def post(self, tag: Any, ok: bool, result: Any) -> None:
        """Called from a worker thread."""
        self._done.append((tag, ok, result))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _drain(self) -> None:
        self._scheduled = False
        done = self._done
        handler = self._handler
        around = self._around
        if around is not None:
            around[0]()
        try:
            while done:
                tag, ok, result = done.popleft()
                handler(tag, ok, result)
        finally:
            if around is not None:
                around[1]()


class WorkerPool:
    """A fixed set of daemon threads running ``fn(*args)`` jobs and posting results to sinks."""

    def __init__(self, workers: int, name: str = "nbd-io") -> None:
        self._queue: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], CompletionSink, Any] | None]
        self._queue = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], sink: CompletionSink, tag: Any) -> None:
        """Queue ``fn(*args)``; its result (or exception) is posted to ``sink`` with ``tag``."""
        self._queue.put((fn, args, sink, tag))

    def _run(self) -> None:
        q = self._queue
        while True:
            job = q.get()
            if job is None:
                return
            fn, args, sink, tag = job
            try:
                result = fn(*args)
            except BaseException as e:
                sink.post(tag, False, e)
            else:
                sink.post(tag, True, result)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Let queued jobs finish, then stop the threads (bounded wait)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
