"""A demand-aware dispatch policy for BentoML's adaptive batcher.

BentoML 1.4's `CorkDispatcher` decides when to release a batch from its own estimate of the
average wait (`n·(wn + dt + a) <= wait`). Under closed-loop load that rule is bimodal: at 32
clients it settles either in one group of ~32 (127-150 req/s on the 2-core machine) or in two
groups of ~16 that alternate (105-121 req/s), because a group that queued during the previous
batch has always "waited long enough" and leaves at once, before the clients just answered are
back (docs/benchmarks.md, "Where the rest goes"). Smaller batches cost more per text on a CPU.

`DemandAwareDispatcher` keeps everything else of BentoML's dispatcher (its queue, batch splitting,
futures, max-latency cancellation, metrics) and changes only that rule: once the model is free, a
batch waits (at most `linger_ms`) until it holds as many requests as were in the system when the
previous batch finished (that batch plus what queued meanwhile), capped at `max_batch_size`.
A lone client is dispatched at once (its demand is 1); clients that do not come back cost one
linger at most, after which the demand is measured again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from _bentoml_impl.server import app as bentoml_app  # the module that builds the dispatchers
from bentoml._internal.marshal.dispatcher import CorkDispatcher

log = logging.getLogger("driftloop.service")


class DemandAwareDispatcher(CorkDispatcher):
    """BentoML's CorkDispatcher with a release rule that waits for the clients just answered."""

    def __init__(self, *args, linger_s: float = 0.05, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.linger_s = linger_s
        self.demand = 1  # requests in the system when the last batch finished
        self.freed_at = 0.0  # when the model last became free

    async def outbound_call(self, inputs_info, training: bool = False):
        try:
            await super().outbound_call(inputs_info, training)
        finally:
            self.demand = max(1, min(self.max_batch_size, len(inputs_info) + len(self._queue)))
            self.freed_at = time.time()

    async def controller(self) -> None:
        """Release a batch when the model is free and the batch holds the measured demand, or when
        the model has been free for `linger_s`; cancel requests past `max_latency` as BentoML does."""
        while True:
            try:
                async with self._wake_event:  # block until there is any request in the queue
                    await self._wake_event.wait_for(self._queue.__len__)
                now = time.time()
                if now - self._queue[0].enqueue_time >= self.max_latency:
                    self._queue.popleft().future.cancel()  # answered by BentoML's fallback (503)
                    continue
                if self._sema.is_locked():
                    await asyncio.sleep(self.TICKET_INTERVAL)
                    continue
                if len(self._queue) < self.demand and now - max(self.freed_at, self._queue[0].enqueue_time) < self.linger_s:
                    await asyncio.sleep(self.TICKET_INTERVAL)
                    continue
                self._sema.acquire()
                self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
            except Exception:  # noqa: BLE001 - as BentoML's controller: one bad round must not stop batching
                log.exception("error dispatching a batch")


def install(linger_ms: int) -> bool:
    """Make BentoML's service app build `DemandAwareDispatcher`s; `linger_ms` 0 keeps BentoML's rule."""
    if linger_ms <= 0:
        return False
    bentoml_app.CorkDispatcher = functools.partial(DemandAwareDispatcher, linger_s=linger_ms / 1000)
    return True
