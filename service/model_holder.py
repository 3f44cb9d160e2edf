"""Which model this worker serves, and the hot swap to a newly promoted one.

BentoML has no hot reload (bentoml#754), so each worker polls the production alias (a cheap
indexed read of one row) and, when it moved, loads and warms the new model *beside* the old one,
then swaps one reference under a lock. A batch takes the reference once, so it runs entirely on
one model; the old model is freed when its last batch finishes. A model that fails to load or warm
up is refused: the old one keeps serving and the failure is logged and counted.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from core import alias, registry, runtimes
from core.inference import Predictor
from service import metrics
from service.settings import ServiceSettings

log = logging.getLogger("driftloop.service")

WARMUP_TEXTS = ["a short warm-up sentence.", "warm-up " * 40]


@dataclass
class ServingModel:
    tag: str
    predictor: Predictor
    lineage: dict
    loaded_at: float = field(default_factory=time.time)

    @property
    def label_names(self) -> list[str]:
        return self.predictor.label_names


class ModelHolder:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one load at a time per worker
        self._current: ServingModel | None = None
        self._failed_tag: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServingModel | None:
        return self._current

    def _load(self, tag: str) -> ServingModel:
        model = registry.get(tag)
        predictor = runtimes.load_runtime_predictor(tag, self.settings.runtime, device=self.settings.device,
                                                    precision=self.settings.precision,
                                                    int8_tolerance_pt=self.settings.int8_tolerance_pt)
        if predictor.runtime != self.settings.runtime:
            metrics.RUNTIME_FALLBACKS.labels(asked=self.settings.runtime, served=predictor.runtime).inc()
        for _ in range(max(1, self.settings.warmup_texts // len(WARMUP_TEXTS))):
            out = predictor.predict(WARMUP_TEXTS)
            if not torch.isfinite(torch.as_tensor(out.probs)).all():
                raise ValueError("warm-up produced non-finite probabilities")
        return ServingModel(model.tag, predictor, model.lineage)

    def sync(self, force: bool = False) -> dict:
        """Serve the production alias's model; returns what happened. Never raises."""
        with self._reload_lock:
            try:
                state = alias.current()
            except Exception as err:  # noqa: BLE001 - a DB hiccup must not kill the poller
                self.last_error = f"cannot read the production alias: {err}"
                return {"status": "error", "error": self.last_error}
            if state is None:
                return {"status": "no_production_model"}
            serving = self._current
            if serving is not None and serving.tag == state.tag:
                return {"status": "unchanged", "model_version": serving.tag}
            if state.tag == self._failed_tag and not force:
                return {"status": "refused", "model_version": serving.tag if serving else None, "error": self.last_error}
            try:
                fresh = self._load(state.tag)
            except Exception as err:  # noqa: BLE001 - any failure to load keeps the old model serving
                self._failed_tag = state.tag
                self.last_error = f"failed to load {state.tag}: {type(err).__name__}: {str(err)[:300]}"
                metrics.MODEL_LOADS.labels(outcome="failure").inc()
                if serving is not None:
                    metrics.MODEL_SWAP_FAILURES.inc()
                log.error("%s; still serving %s", self.last_error, serving.tag if serving else "nothing")
                return {"status": "refused", "model_version": serving.tag if serving else None, "error": self.last_error}
            with self._lock:
                previous, self._current = self._current, fresh
            self._failed_tag = None
            self.last_error = None
            metrics.MODEL_LOADS.labels(outcome="success").inc()
            metrics.set_serving(fresh.tag, previous.tag if previous else None, fresh.loaded_at, fresh.predictor.runtime,
                                previous.predictor.runtime if previous else None)
            if previous is not None:
                metrics.MODEL_SWAPS.inc()
                log.info("hot-swapped %s -> %s (runtime %s)", previous.tag, fresh.tag, fresh.predictor.runtime)
                del previous
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            else:
                log.info("serving %s (runtime %s%s)", fresh.tag, fresh.predictor.runtime,
                         f": {fresh.predictor.runtime_note}" if fresh.predictor.runtime_note else "")
            return {"status": "swapped", "model_version": fresh.tag}

    def start_polling(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.settings.reload_interval_s):
                self.sync()

        self._thread = threading.Thread(target=loop, name="driftloop-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
