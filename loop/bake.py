"""The bake: after a promotion, the new champion must hold up on the live traffic it was promoted for.

Once the new champion has served `policy.bake_labels` labelled items, the previous champion (loaded
in the controller by `ShadowScorer`) scores the same items, and one paired test decides, once per
promotion: roll back if the new champion is significantly worse (exact one-sided McNemar at
`policy.bake_alpha`), else the bake passes. The rollback goes through `core.production`, fenced
with the leader's term.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.engine import Engine

from core import alias, audit, predlog, production, runtimes
from core.errors import DriftloopError
from loop.lease import Fence
from loop.paired import PairedComparison, mcnemar_one_sided
from loop.policy import PolicyConfig
from monitoring import exporter
from monitoring.verdict import Verdict

log = logging.getLogger("driftloop.loop")


def in_bake(engine: Engine, version: str) -> dict | None:
    """The promotion event of `version` while its bake has not decided yet, else None (also for a
    first model: with no previous champion there is nothing to bake against)."""
    promo = audit.last(engine, "promotion")
    if promo is None or promo["model_version"] != version or not promo.get("previous"):
        return None
    done = audit.history(engine, limit=20, kinds=("bake_passed", "rollback"))
    if any(e["id"] > promo["id"] and e["model_version"] == version for e in done):
        return None
    return promo


class ShadowScorer:
    """The previous champion, loaded in the controller for the bake: it scores the same labelled items
    the new champion served, on the runtime it served on (`runtimes.serving_choice`: the new champion's
    answers in the log came from that runtime too). Keeps one model at a time and drops it once the
    bake has decided."""

    def __init__(self, device: str = "cpu", choice: runtimes.ServingChoice | None = None):
        self.device = device
        self.choice = choice
        self._tag: tuple[str, runtimes.ServingChoice] | None = None
        self._predictor = None

    def correct(self, tag: str, texts: list[str], labels: list[str], served_on: str | None = None) -> list[bool]:
        """Which of `texts` the model `tag` labels right, scored on the runtime it served on
        (`served_on`, from the prediction log, unless this scorer or the environment says otherwise)."""
        choice = self.choice or runtimes.serving_choice(observed=served_on)
        if self._tag != (tag, choice):
            self._predictor, self._tag = choice.load(tag, device=self.device), (tag, choice)
        out = self._predictor.predict(texts)
        names = self._predictor.label_names
        return [names[i] == y for i, y in zip(out.labels, labels)]

    def release(self) -> None:
        self._tag = self._predictor = None


def bake_check(engine: Engine, verdict: Verdict, policy: PolicyConfig, *, scorer: ShadowScorer | None = None,
               fence: Fence | None = None) -> str | None:
    """After a promotion: once the new champion has `bake_labels` labelled items, the previous champion
    scores the same items and one paired test decides: roll back if the new one is significantly
    worse (exact one-sided McNemar at `bake_alpha`), else the bake passes. Decided once per promotion."""
    version = verdict.model_version
    promo = in_bake(engine, version)
    if promo is None:
        return None
    previous = promo["previous"]
    promoted_at = dt.datetime.fromisoformat(promo["at"])
    first = predlog.first_id_at(engine, promoted_at)
    if first is not None and predlog.texts_kept(engine, version, first) is False:
        # hash-only mode: the previous champion can never re-score these items, so the bake would wait
        # forever (and with it the policy's first-bake rule); decided at once, saying why
        reason = ("the service stores text hashes only (store_text=False): the previous champion cannot re-score "
                  "the new champion's items, so there is no paired bake; the gate before the promotion stands")
        log.warning("bake of %s skipped: %s", version, reason)
        audit.record(engine, "bake_passed", version, previous=previous, skipped=reason)
        return "bake_passed"
    items = predlog.labelled_after(engine, version, promoted_at, policy.bake_labels)
    if len(items) < policy.bake_labels:
        return None
    scorer = scorer or ShadowScorer()
    texts, truth = [t for t, _, _ in items], [f for _, _, f in items]
    try:
        old = scorer.correct(previous, texts, truth, served_on=predlog.recent_runtime(engine, previous))
    except DriftloopError as err:  # the previous model is gone from the store: nothing to compare or return to
        log.warning("bake of %s: previous champion %s cannot score (%s); bake passed by default", version, previous, err)
        audit.record(engine, "bake_passed", version, previous=previous, skipped=str(err))
        return "bake_passed"
    finally:
        scorer.release()
    cmp = PairedComparison.of(old, [served == f for _, served, f in items])
    p_worse = mcnemar_one_sided(cmp.losses, cmp.gains)  # evidence that the previous champion is better
    details = {"previous": previous, "paired": cmp.to_json(), "p_value_worse": p_worse, "alpha": policy.bake_alpha,
               # what this bake could see: the smallest loss its items catch with bake_power at bake_discordance
               "power": {"items": cmp.n, "detectable_loss": policy.bake_detectable_loss(), "at_power": policy.bake_power,
                         "assumed_discordance": policy.bake_discordance,
                         "observed_discordance": (cmp.gains + cmp.losses) / cmp.n if cmp.n else None}}
    if p_worse <= policy.bake_alpha:
        reason = (f"bake: on the same {cmp.n} labelled items the new champion scored {cmp.candidate_accuracy:.3f}, the previous "
                  f"{cmp.incumbent_accuracy:.3f} ({cmp.losses} lost, {cmp.gains} gained, McNemar p={p_worse:.3g} <= {policy.bake_alpha})")
        # undo exactly this promotion, and only while production still serves the model baked (an operator
        # may have promoted another meanwhile: that one is not the bake's to undo). With the pointer still
        # at `version`, rolling back returns it to the model that promotion replaced, `previous`.
        checks = [c for c in (fence.check if fence else None, alias.still_at(version, doing="rolling back")) if c is not None]
        try:
            production.rollback(reason=reason, actor="controller", engine=engine,
                                fence=lambda conn: [check(conn) for check in checks], **details)
        except DriftloopError as err:
            log.warning("bake rollback of %s refused: %s", version, err)
            return None
        exporter.ROLLBACKS.inc()
        return "rollback"
    audit.record(engine, "bake_passed", version, **details)
    return "bake_passed"


def bake_status(engine: Engine, version: str, policy: PolicyConfig) -> dict | None:
    """Where the serving model's bake stands, for /status: None when none is due (no promotion over a
    previous champion, or it decided); else how many labelled items with text it has of the
    `bake_labels` it needs, and whether it can finish at all."""
    promo = in_bake(engine, version)
    if promo is None:
        return None
    promoted_at = dt.datetime.fromisoformat(promo["at"])
    labelled, with_text = predlog.labelled_since_count(engine, version, promoted_at, cap=policy.bake_labels)
    first = predlog.first_id_at(engine, promoted_at)
    kept = predlog.texts_kept(engine, version, first) if first is not None else None
    return {"model_version": version, "previous": promo["previous"], "promoted_at": promo["at"],
            "labelled_items": labelled, "labelled_items_with_text": with_text, "needed": policy.bake_labels,
            "state": "skipping: hash-only log (decided at the next pass)" if kept is False else "waiting for labelled items"}
