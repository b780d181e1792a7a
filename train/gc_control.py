"""Python garbage collection at fixed steps instead of at random moments (see LoopConfig.gc_every).

Automatic collection starts whenever a rank's allocation counters cross a threshold; a full collection over the
objects a compiled, sharded model keeps alive takes milliseconds, and in a data-parallel job every other rank
waits for the paused one at the next collective. Collecting on the same steps everywhere turns many
unaligned pauses into few aligned ones.
"""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def scheduled_gc(every: int):
    """Inside: automatic collection off; call the yielded function after each step. Restores the old state."""
    if every <= 0:
        yield lambda step: None
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()  # start clean: model construction left garbage behind

    compiled = False

    def after_step(step: int) -> None:
        nonlocal compiled
        if not compiled:
            # this process's first step compiled the model (also after a resume): hundreds of thousands of objects,
            # collected now rather than as a half-second pause inside a later step's timing window
            compiled = True
            gc.collect()
        elif step % every == 0:
            # young generations: quick. Every 10th time a full collection, so that cycles which died after being
            # promoted to the oldest generation are freed too (automatic collection would have found them).
            gc.collect(2 if step % (10 * every) == 0 else 1)

    try:
        yield after_step
    finally:
        if was_enabled:
            gc.enable()
