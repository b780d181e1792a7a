"""scheduled_gc: automatic collection off inside, collections on the scheduled steps, old state restored."""
import gc

from train.gc_control import scheduled_gc


def _make_cycle():
    a = []
    a.append(a)  # only the cycle collector frees this


def test_collects_on_schedule_only(monkeypatch):
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or real_collect(generation))
    assert gc.isenabled()
    with scheduled_gc(3) as after_step:
        assert not gc.isenabled()
        assert calls == [2]  # one full collection at the start
        for step in range(1, 8):
            _make_cycle()
            after_step(step)
        assert calls == [2, 2, 1, 1]  # after the first (compiling) step a full one; steps 3 and 6: young generations
        for step in range(8, 31):
            after_step(step)
        assert calls == [2, 2, 1, 1] + [1] * 7 + [2]  # steps 9 .. 27, then a full collection at step 30
    assert gc.isenabled()


def test_zero_leaves_gc_automatic():
    with scheduled_gc(0) as after_step:
        assert gc.isenabled()
        after_step(1)
    assert gc.isenabled()


def test_restores_disabled_state():
    gc.disable()
    try:
        with scheduled_gc(5):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_full_collection_after_the_first_step_of_a_resumed_run(monkeypatch):
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or real_collect(generation))
    with scheduled_gc(50) as after_step:
        after_step(1001)  # a resumed run's first step compiles too
        after_step(1002)
        assert calls == [2, 2]
        after_step(1050)
        assert calls == [2, 2, 1]
