"""Unit tier for gateway/foreground.py: while FUSE requests flow, drain requests start more slowly."""

from __future__ import annotations

import pytest
import trio

from gateway.foreground import Foreground

pytestmark = pytest.mark.trio


async def test_an_idle_mount_gives_the_drain_its_turns_at_once(autojump_clock):
    fg = Foreground(busy_window_s=0.05, spacing_s=0.02)
    t0 = trio.current_time()
    for _ in range(10):
        await fg.turn()
    assert trio.current_time() == t0 and fg.yielded_s == 0


async def test_while_requests_flow_drain_requests_start_spacing_apart(autojump_clock):
    fg = Foreground(busy_window_s=0.05, spacing_s=0.02)
    starts: list[float] = []

    async def app() -> None:  # a request every 10 ms for 0.5 s
        for _ in range(50):
            fg.note_request()
            await trio.sleep(0.01)

    async def request() -> None:
        await fg.turn()
        starts.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app)
        await trio.sleep(0)
        for _ in range(10):
            nursery.start_soon(request)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 10 and min(gaps) >= 0.02 - 1e-9
    assert starts[-1] - t0 == pytest.approx(0.18)
    assert fg.yielded_s > 0


async def test_waiting_drain_requests_go_as_soon_as_the_application_pauses(autojump_clock):
    fg = Foreground(busy_window_s=0.05, spacing_s=1.0)
    fg.note_request()  # then nothing more
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(fg.turn)
    assert trio.current_time() - t0 <= 0.05 + 1e-9, "a quiet mount must not keep the drain waiting"
