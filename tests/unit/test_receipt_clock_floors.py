"""``ReceiptClock``'s two floors: an instant taken here for an input of this gateway's own never
moves the instants of the inputs a fleet's stream carries (``at``), and no instant is handed out
twice or before one it follows (module docstring of ``enforcer.receipt_clock``)."""

from __future__ import annotations

from enforcer.receipt_clock import TICK, ReceiptClock


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def clock(now: float, floor: float = 0.0) -> tuple[ReceiptClock, Wall]:
    wall = Wall(now)
    return ReceiptClock(wall, floor=floor, monotonic=lambda: 0.0), wall


def test_a_local_instant_does_not_move_an_older_stream_input() -> None:
    """A gateway catching up: something of its own stamped now, then the replay's old inputs keep
    their instants, still in the stream's order among themselves."""
    receipts, _ = clock(10_000.0, floor=100.0)
    assert receipts.stamp() == 10_000.0                  # this gateway's own: now
    assert receipts.floor == 100.0                       # the stream's floor did not move
    assert receipts.stamp(500.0) == 500.0                # a payment of long ago stays long ago
    assert receipts.stamp(400.0) == 500.0 + TICK         # stream order kept (a slower clock elsewhere)
    assert receipts.stamp() == 10_000.0 + TICK           # and its own next input follows everything
    assert receipts.floor == 500.0 + TICK


def test_a_stream_input_as_new_as_a_local_one_follows_it() -> None:
    """Not older than the first local instant: after every local one (no instant twice), and
    the floors are one again."""
    receipts, wall = clock(1_000.0, floor=100.0)
    first = receipts.stamp()
    second = receipts.stamp()
    assert (first, second) == (1_000.0, 1_000.0 + TICK)
    streamed = receipts.stamp(1_000.0)                   # same clock reading as the local one
    assert streamed == second + TICK and streamed not in (first, second)
    assert receipts.floor == receipts.last == streamed
    wall.now = 2_000.0
    assert receipts.stamp(900.0) == streamed + TICK      # floored among the stream's inputs, as before


def test_a_lone_gateway_keeps_one_floor_also_when_its_clock_steps_back() -> None:
    receipts, wall = clock(1_000.0, floor=900.0)
    assert receipts.stamp() == 1_000.0
    wall.now = 500.0                                     # stepped back
    assert receipts.stamp() == 1_000.0 + TICK
    assert receipts.stamp() == 1_000.0 + 2 * TICK
    assert receipts.stepped_back() == 500.0 + 2 * TICK


def test_a_step_back_after_local_instants_keeps_stream_inputs_after_the_saved_state() -> None:
    """The saved state's newest instant floors both: a stream input never sorts before it."""
    receipts, wall = clock(1_000.0, floor=950.0)
    receipts.stamp()
    wall.now = 600.0                                     # stepped back
    assert receipts.stamp(700.0) == 950.0 + TICK         # at most now, after the saved state, before the local one
    assert receipts.stamp() == 1_000.0 + TICK


def test_the_floor_leaves_out_local_instants() -> None:
    receipts, _ = clock(1_000.0, floor=500.0)
    receipts.stamp()
    assert receipts.floor == 500.0 and receipts.floor == 500.0 and receipts.last == 1_000.0
