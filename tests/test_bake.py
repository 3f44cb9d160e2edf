"""The bake's rollback undoes exactly the promotion it baked (issue: a rollback that did not say
what it undid could roll back a model an operator promoted while the bake was scoring)."""

from __future__ import annotations

import types

import numpy as np


class PreviousChampionAlwaysRight:
    """Stands in for the shadow-scoring previous champion only: what is under test is the move the
    bake makes with the paired result, not the scoring (tests/test_loop.py runs the real scorer)."""

    def correct(self, tag, texts, labels, served_on=None):
        return [True] * len(texts)

    def release(self):
        pass


def _baked_items(engine, version: str, n: int):
    from core import predlog
    from core.descriptors import DESCRIPTOR_COLUMNS

    rows = [predlog.LoggedPrediction(request_id=f"{i:032x}", text=f"item {i}", label="positive", confidence=0.9,
                                     probs={"negative": 0.1, "positive": 0.9}, descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0),
                                     truncated=False, embedding=np.zeros(4, dtype=np.float32)) for i in range(n)]
    predlog.write_batch(engine, version, rows)
    predlog.record_feedback(engine, [(r.request_id, "negative") for r in rows], lambda v: ["negative", "positive"])  # all wrong


def test_the_bake_rolls_back_its_own_promotion_to_the_model_before(db_url, registered_tiny_model):
    from core import alias, audit, predlog, production
    from core.statedb import get_engine
    from loop.bake import bake_check
    from loop.policy import PolicyConfig

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    previous = registered_tiny_model  # a real model: a rollback goes only to a model the store has
    for tag in ("m:a", previous, "m:c"):
        production.promote(tag, reason="setup", actor="test", engine=engine, verify=False)
    _baked_items(engine, "m:c", 10)
    out = bake_check(engine, types.SimpleNamespace(model_version="m:c"), PolicyConfig(bake_labels=10),
                     scorer=PreviousChampionAlwaysRight())
    assert out == "rollback" and alias.current(engine=engine).tag == previous
    event = audit.last(engine, "rollback")
    assert event["to"] == previous and event["previous"] == previous


def test_the_bake_never_rolls_back_a_model_an_operator_promoted_meanwhile(db_url, registered_tiny_model):
    from core import alias, audit, predlog, production
    from core.statedb import get_engine
    from loop import bake
    from loop.policy import PolicyConfig

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    production.promote(registered_tiny_model, reason="setup", actor="test", engine=engine, verify=False)  # a rollback could go there
    production.promote("m:new", reason="gate passed", actor="controller", engine=engine, verify=False)
    _baked_items(engine, "m:new", 10)

    class OperatorPromotesWhileScoring(PreviousChampionAlwaysRight):
        def correct(self, tag, texts, labels, served_on=None):
            production.promote("m:operator", reason="hotfix", actor="operator", engine=engine, verify=False)
            return super().correct(tag, texts, labels, served_on)

    out = bake.bake_check(engine, types.SimpleNamespace(model_version="m:new"), PolicyConfig(bake_labels=10),
                          scorer=OperatorPromotesWhileScoring())
    assert out is None, "refused: production moved meanwhile"
    assert alias.current(engine=engine).tag == "m:operator"
    assert audit.last(engine, "rollback") is None


def test_the_real_shadow_scorer_scores_the_previous_champion_as_it_serves(registered_tiny_model):
    """ShadowScorer loads the previous champion on the runtime it served on and says, per item,
    whether it is right: the same answers that model gives through the serving code."""
    from core import inference
    from loop.bake import ShadowScorer

    texts = ["the battery lasts for days", "it broke after a week", "great value", "awful support", "fine"]
    served = inference.load_predictor(registered_tiny_model, device="cpu").predict(texts)
    names = inference.load_predictor(registered_tiny_model, device="cpu").label_names
    predicted = [names[i] for i in served.labels]
    truth = [predicted[0], "negative" if predicted[1] == "positive" else "positive", predicted[2], predicted[3],
             "negative" if predicted[4] == "positive" else "positive"]
    scorer = ShadowScorer()
    flags = scorer.correct(registered_tiny_model, texts, truth, served_on="torch")
    assert flags == [True, False, True, True, False]
    assert scorer._tag is not None  # kept between passes
    scorer.release()
    assert scorer._tag is None and scorer._predictor is None
