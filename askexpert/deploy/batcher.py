"""Dynamic batching in one thread, for the inline engine.

A batch closes when it holds `max_batch_size` requests or when its first request has waited `window_s`; it then
runs (`run_batch`, e.g. ExpertModels.predict) in this thread while the next batch fills. The wait is a condition
variable's timed wait in a plain thread (microsecond-precise), not an event loop's timer (millisecond-granular):
at batch 1 the edge pays the window and little else.

Requests are handed in from any thread and answered through `concurrent.futures.Future`s (an asyncio handler
awaits one with `asyncio.wrap_future`). A request whose caller gave up (timeout) before its batch ran is
cancelled and skipped, so a slow model does not grow a queue of answers nobody waits for. `close` answers what
is queued without waiting for windows, then stops the thread: the drain at shutdown.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future


class Batcher:
    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int, window_s: float):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._queue: deque[tuple[float, object, Future]] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, item) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._queue.append((time.monotonic(), item, future))
            self._ready.notify()
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float | None = None) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout_s)

    def _next_batch(self) -> list[tuple[object, Future]] | None:
        with self._ready:
            while not self._queue and not self._closing:
                self._ready.wait()
            if not self._queue:
                return None  # closing and nothing left
            deadline = self._queue[0][0] + self.window_s  # the window counts from the first request's arrival
            while len(self._queue) < self.max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            count = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft()[1:] for _ in range(count)]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outputs = list(self.run_batch([item for item, _ in live]))
                if len(outputs) != len(live):
                    raise RuntimeError(f"the model gave {len(outputs)} answers for {len(live)} requests")
            except Exception as err:  # noqa: BLE001 (each caller gets the model's error; the thread goes on)
                for _, future in live:
                    future.set_exception(err)
                continue
            for (_, future), output in zip(live, outputs, strict=True):
                future.set_result(output)
