"""controller.yielding: background copies give way to clients' I/O, in line, without polling."""

from __future__ import annotations

import asyncio
import itertools
import time

from controller.yielding import Yield


class Clients:
    """When clients last did I/O, set by the test."""

    def __init__(self) -> None:
        self.at = 0.0

    def busy(self) -> None:
        self.at = time.monotonic() + 3600  # busy for the whole test

    def quiet(self) -> None:
        self.at = 0.0


def test_copies_go_at_once_while_clients_are_quiet() -> None:
    async def scenario() -> None:
        clients = Clients()
        gate = Yield(lambda: clients.at, window=0.05, busy_slots=2)
        await asyncio.wait_for(asyncio.gather(*(gate.enter() for _ in range(50))), 1)
        assert gate.running == 50

    asyncio.run(scenario())


def test_while_clients_are_busy_copies_wait_in_line_and_go_one_at_a_time() -> None:
    async def scenario() -> None:
        clients = Clients()
        clients.busy()
        gate = Yield(lambda: clients.at, window=0.05, busy_slots=2)
        order: list[int] = []

        async def copy(n: int) -> None:
            await gate.enter()
            order.append(n)

        tasks = [asyncio.create_task(copy(n)) for n in range(6)]
        await asyncio.sleep(0.05)
        assert order == [0, 1] and gate.running == 2
        gate.leave()
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and gate.running == 2  # one left, one let in
        tasks[4].cancel()  # gave up while in line: takes no slot
        gate.leave()
        gate.leave()
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2, 3, 5] and gate.running == 2
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_when_clients_go_quiet_everyone_in_line_goes_within_the_window() -> None:
    async def scenario() -> None:
        clients = Clients()
        clients.at = time.monotonic()
        gate = Yield(lambda: clients.at, window=0.1, busy_slots=1)
        await gate.enter()
        waiting = [asyncio.create_task(gate.enter()) for _ in range(20)]
        await asyncio.sleep(0.02)
        assert not any(t.done() for t in waiting)
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert time.monotonic() - started < 0.2
        assert gate.running == 21
        assert gate._watcher is None  # nothing left watching

    asyncio.run(scenario())


def test_while_clients_are_busy_copies_start_no_closer_than_the_gap() -> None:
    async def scenario() -> None:
        clients = Clients()
        clients.busy()
        gate = Yield(lambda: clients.at, window=0.05, busy_slots=2, busy_gap=0.03)
        starts: list[float] = []

        async def copy() -> None:
            await gate.enter()
            starts.append(time.monotonic())
            gate.leave()  # done at once: only the gap holds the next one back

        await asyncio.wait_for(asyncio.gather(*(copy() for _ in range(6))), 2)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 6 and min(gaps) >= 0.029, gaps

    asyncio.run(scenario())
