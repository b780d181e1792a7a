"""time_steps: the clock runs over the timed steps only, never over a garbage collection it did not schedule."""
import gc
import time
from types import SimpleNamespace

import pytest

from train import bench_steps


class _GarbageSteps:
    """Duck-typed StepSetup whose warmup steps leave cyclic garbage behind, as compiling does."""

    def __init__(self, events):
        self.events = events
        self.cfg = SimpleNamespace(train=SimpleNamespace(gc_every=50))
        self.calls = 0

    def step(self):
        self.calls += 1
        self.events.append(("step", self.calls))
        if self.calls == 1:
            for _ in range(20000):
                a = []
                a.append(a)

    def sync(self):
        pass


def test_no_collection_inside_the_timed_window(monkeypatch):
    events = []  # ("clock", i) and ("gc", generation) in the order they happened
    clock = iter(range(1000))
    monkeypatch.setattr(bench_steps.time, "perf_counter", lambda: events.append(("clock",)) or float(next(clock)))

    def on_gc(phase, info):
        if phase == "start":
            events.append(("gc", info["generation"]))

    old_threshold = gc.get_threshold()
    gc.set_threshold(100)  # the collection that re-enabling starts comes at once
    gc.callbacks.append(on_gc)
    try:
        per_step = bench_steps.time_steps(_GarbageSteps(events), warmup=2, steps=5)
    finally:
        gc.callbacks.remove(on_gc)
        gc.set_threshold(*old_threshold)
    clocks = [i for i, e in enumerate(events) if e[0] == "clock"]
    assert len(clocks) == 2, events
    inside = [e for e in events[clocks[0]:clocks[1]] if e[0] == "gc"]
    assert inside == [], f"collections inside the timed window: {inside}"
    # the warmup's garbage was collected after the last warmup step, before the clock started
    last_warmup = events.index(("step", 2))
    assert ("gc", 2) in events[last_warmup:clocks[0]]
    assert per_step == pytest.approx(1 / 5)
