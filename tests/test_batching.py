"""The demand-aware release rule (service/batching.py) on BentoML's real dispatcher machinery.

A fake model (its time grows with the batch) and closed-loop clients that come back one by one
after their answer, as a single event loop answers them: the rule must gather one group of all
clients, answer a lone client at once, wait at most the linger for clients that do not come back,
and still cancel requests past max_latency as BentoML does.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.batching import DemandAwareDispatcher, install


def make(linger_ms: int = 50, max_batch_size: int = 64, max_latency_ms: int = 30_000) -> DemandAwareDispatcher:
    return DemandAwareDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size, linger_s=linger_ms / 1000,
                                 fallback=lambda: "overloaded", get_batch_size=lambda _: 1)


def fake_model(sizes: list[int], per_item_s: float = 0.002, fixed_s: float = 0.005):
    async def infer(batch):
        sizes.append(len(batch))
        await asyncio.sleep(fixed_s + per_item_s * len(batch))
        return [x * 2 for x in batch]
    return infer


async def closed_loop(dispatcher, clients: int, duration_s: float, sizes: list[int]) -> int:
    call = dispatcher(fake_model(sizes))
    answered = 0
    deadline = time.monotonic() + duration_s

    async def client(i: int) -> None:
        nonlocal answered
        while time.monotonic() < deadline:
            assert await call(i) == i * 2
            answered += 1
            await asyncio.sleep(0.0005 * (i % 8))  # answers leave one by one, clients come back staggered

    await asyncio.gather(*(client(i) for i in range(clients)))
    return answered


def test_closed_loop_clients_form_one_group():
    sizes: list[int] = []
    answered = asyncio.run(closed_loop(make(), clients=32, duration_s=2.0, sizes=sizes))
    steady = sizes[3:]
    assert answered == sum(sizes)
    assert len(steady) > 5
    assert sum(steady) / len(steady) >= 28, steady  # BentoML's rule may settle in two groups of ~16


def test_a_lone_client_is_not_kept_waiting():
    sizes: list[int] = []

    async def run() -> list[float]:
        call = make(linger_ms=500)(fake_model(sizes, per_item_s=0, fixed_s=0.001))
        waits = []
        for i in range(5):
            t0 = time.perf_counter()
            await call(i)
            waits.append(time.perf_counter() - t0)
        return waits

    waits = asyncio.run(run())
    assert sizes == [1] * 5
    assert max(waits) < 0.25, waits  # the demand is one: no 500 ms linger


def test_clients_that_do_not_come_back_cost_one_linger_at_most():
    sizes: list[int] = []

    async def run() -> float:
        call = make(linger_ms=100)(fake_model(sizes, per_item_s=0, fixed_s=0.001))
        await asyncio.gather(*(call(i) for i in range(20)))  # a burst: the demand is now ~20
        t0 = time.perf_counter()
        await call(99)  # a lone straggler
        return time.perf_counter() - t0

    waited = asyncio.run(run())
    assert 0.05 <= waited < 0.5, waited
    assert sizes[-1] == 1


def test_requests_past_max_latency_are_cancelled_as_bentoml_does():
    sizes: list[int] = []

    async def run() -> list:
        dispatcher = make(linger_ms=10, max_batch_size=1, max_latency_ms=50)
        call = dispatcher(fake_model(sizes, per_item_s=0, fixed_s=0.2))  # slower than max_latency
        return await asyncio.gather(*(call(i) for i in range(4)))

    results = asyncio.run(run())
    assert results[0] == 0
    assert "overloaded" in results  # BentoML's fallback, which the service turns into a 503


def test_install_replaces_the_dispatcher_bentoml_builds():
    from _bentoml_impl.server import app
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    before = app.CorkDispatcher
    try:
        assert install(0) is False
        assert app.CorkDispatcher is before
        assert install(30) is True
        built = app.CorkDispatcher(max_latency_in_ms=1000, max_batch_size=8, fallback=lambda: None)  # as app.py builds it
        assert isinstance(built, DemandAwareDispatcher) and isinstance(built, CorkDispatcher)
        assert built.linger_s == pytest.approx(0.03)
    finally:
        app.CorkDispatcher = before
