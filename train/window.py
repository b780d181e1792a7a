"""Throughput over a window of training steps: time per step, the host's wait for batches, the memory layers'
collectives. A window restarts after every log line, validation and checkpoint, so their time is not counted."""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List


class StepWindow:
    def __init__(self, memory_comm=None):
        self.memory_comm = memory_comm  # ops.column_parallel.CollectiveTimer, when values are split over ranks
        self.start, self.steps, self.data_wait_s = time.perf_counter(), 0, 0.0

    def restart(self) -> None:
        if self.memory_comm is not None:
            self.memory_comm.read_ms()
        self.start, self.steps, self.data_wait_s = time.perf_counter(), 0, 0.0

    def next_batches(self, batches: Iterator, n: int) -> List[Any]:
        """The next `n` batches, the time waited for them counted as data wait."""
        t = time.perf_counter()
        out = [next(batches) for _ in range(n)]
        self.data_wait_s += time.perf_counter() - t
        return out

    def step_done(self) -> None:
        self.steps += 1

    def rates(self, tokens_per_step: int, world_size: int, steps_left: int) -> Dict[str, float]:
        """Throughput, data wait and (when timed) memory-layer collectives per step of the window so far."""
        now = time.perf_counter()
        step_time = (now - self.start) / self.steps
        out = {
            "tokens_per_s": tokens_per_step / step_time,
            "tokens_per_s_per_device": tokens_per_step / step_time / world_size,
            "eta_s": step_time * steps_left,
            "data_wait_ms": self.data_wait_s * 1e3 / self.steps,  # per step: the loop waiting for batches
            "data_wait_frac": self.data_wait_s / (now - self.start),
        }
        if self.memory_comm is not None:  # lookups forward and backward, value-gradient sum
            comm_s = self.memory_comm.read_ms() / 1e3 / self.steps
            out.update(memory_comm_ms=comm_s * 1e3, memory_comm_frac=comm_s / step_time)
        return out
