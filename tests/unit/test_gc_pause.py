"""The collector pause nests, overlaps across threads, and restores what it found."""

from __future__ import annotations

import gc
import threading

from enforcer.gc_pause import gc_paused


def test_pauses_nest_and_overlap_and_restore_the_previous_state() -> None:
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with gc_paused():
            entered.set()
            release.wait(5)

    worker = threading.Thread(target=other_thread)
    with gc_paused():
        worker.start()
        assert entered.wait(5)
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled(), "the other thread's pause is still open"
    release.set()
    worker.join(5)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_exception_inside_still_ends_the_pause() -> None:
    try:
        with gc_paused():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.isenabled()
