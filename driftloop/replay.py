"""`driftloop replay`: real labelled traffic against a running service, with late feedback.

Sends single-text requests at a given rate (bounded by count and concurrency), then, after a delay,
posts the true label for a given fraction of them: how users, the demo and the benchmarks simulate
production. /feedback needs the feedback token: it is sent from this home (DRIFTLOOP_FEEDBACK_TOKEN
or $DRIFTLOOP_HOME/secrets/feedback.token) unless `headers` carry an Authorization of their own.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from core import tokens
from finetune.data import clean, read_table, resolve_text_column


@dataclass
class ReplayStats:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    feedback_posted: int = 0
    feedback_errors: int = 0
    feedback_denied: int = 0  # of the errors: refused for the token (401/403)
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    correct: int = 0
    request_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "request_ids"}
        out["accuracy"] = round(self.correct / self.ok, 4) if self.ok else None
        return out


async def replay_async(url: str, rows: list[tuple[str, str]], *, rate: float | None = None, concurrency: int = 8,
                       feedback_fraction: float = 0.0, feedback_delay_s: float = 0.0, seed: int = 0,
                       timeout_s: float = 120.0, headers: dict | None = None) -> ReplayStats:
    """Predict every row (text, label); `rate` caps requests per second overall (None: as fast as allowed).

    `headers` go with every request; without an Authorization among them, /feedback gets this
    home's feedback token (read when the feedback is posted, so a service that generated it at
    startup is found) and /predict this home's predict token when there is one.
    """

    explicit_auth = any(k.lower() == "authorization" for k in (headers or {}))

    def auth(kind: tokens.Kind) -> dict[str, str]:
        return {} if explicit_auth else tokens.authorization_header(kind)

    stats = ReplayStats()
    rng = random.Random(seed)
    started = time.perf_counter()
    answered: list[tuple[str, str]] = []  # (request id, true label)
    next_index = 0
    interval = 1.0 / rate if rate else 0.0

    predict_auth = auth("predict")
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers or {}) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(rows):
                i = next_index
                next_index += 1
                if interval:
                    delay = started + i * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                text, label = rows[i]
                stats.sent += 1
                try:
                    r = await client.post("/predict", json={"texts": [text]}, headers=predict_auth)
                except httpx.HTTPError:
                    stats.errors += 1
                    continue
                if r.status_code != 200:
                    stats.errors += 1
                    continue
                answer = r.json()[0]
                stats.ok += 1
                stats.correct += answer["label"] == label
                stats.versions[answer["model_version"]] = stats.versions.get(answer["model_version"], 0) + 1
                stats.request_ids.append(answer["request_id"])
                answered.append((answer["request_id"], label))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        chosen = [(rid, y) for rid, y in answered if rng.random() < feedback_fraction]
        if chosen:
            if feedback_delay_s:
                await asyncio.sleep(feedback_delay_s)
            feedback_auth = auth("feedback")
            for s in range(0, len(chosen), 500):
                part = chosen[s:s + 500]
                try:
                    r = await client.post("/feedback", json={"items": [{"request_id": rid, "label": y} for rid, y in part]},
                                          headers=feedback_auth)
                    ok = r.status_code == 200
                    if r.status_code in (401, 403):
                        stats.feedback_denied += len(part)
                except httpx.HTTPError:
                    ok = False
                if ok:
                    stats.feedback_posted += len(part)
                else:
                    stats.feedback_errors += len(part)
    stats.seconds = round(time.perf_counter() - started, 2)
    return stats


def replay(url: str, rows: list[tuple[str, str]], **kw) -> ReplayStats:
    return asyncio.run(replay_async(url, rows, **kw))


def labelled_rows(source: str, text_column: str | None = None, label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from any file the trainer reads, cleaned the same way."""
    df = read_table(source, text_column, label_column)
    column = resolve_text_column(df, text_column, source)
    rows, _ = clean(df, column, label_column, source, max_chars=100_000, deduplicate=False)
    return list(zip(rows["text"], rows["label"]))
