"""Label provenance: labels asked for because the model was unsure train, and nothing else.

Actively chosen labels are not a sample of the traffic (Farquhar et al., ICLR 2021): accuracy on
them is biased low. So the realized accuracy, the estimate's measured error, the bake's paired
items and the gate's fresh items read only organic feedback and the uniformly random requested
sample (core/predlog.py UNBIASED); informative labels go to training only. Each test here would
fail if an informative label reached one of those figures: the informative labels are all wrong,
the unbiased ones all right.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import numpy as np
import pytest

LABELS = ["negative", "positive"]


def _rows(n: int, start: int):
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction

    return [LoggedPrediction(request_id=f"{start + i:032x}", text=f"text {start + i}", label="positive", confidence=0.8,
                             probs={"negative": 0.2, "positive": 0.8}, descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0),
                             truncated=False, embedding=np.ones(8, dtype=np.float32)) for i in range(n)]


@pytest.fixture()
def labelled_log(state_db_url):
    """300 predictions of m:1 (all "positive"): 60 organic labels and 60 requested at random, all
    agreeing; 90 requested as informative, all disagreeing."""
    from core import predlog
    from core.statedb import get_engine

    engine = get_engine(state_db_url)
    predlog.ensure_schema(engine)
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    rows = _rows(300, 0)
    predlog.write_batch(engine, "m:1", rows)
    ids = [r.request_id for r in rows]
    labels = lambda version: LABELS  # noqa: E731
    predlog.record_feedback(engine, [(i, "positive") for i in ids[:60]], labels)
    predlog.record_feedback(engine, [(i, "positive") for i in ids[60:120]], labels, source=predlog.REQUESTED_RANDOM, annotator="ann")
    predlog.record_feedback(engine, [(i, "negative") for i in ids[120:210]], labels, source=predlog.REQUESTED_INFORMATIVE,
                            annotator="ann")
    return engine, ids, before


def test_no_accuracy_figure_reads_an_informative_label(labelled_log):
    from core import predlog
    from monitoring import window
    from monitoring.analysis import quality
    from monitoring.config import MonitorConfig

    engine, _, _ = labelled_log
    win = window.load(engine, "m:1", LABELS, last=1000)
    assert win.frame["label"].notna().sum() == 120
    q = quality(SimpleNamespace(label_names=LABELS), win, MonitorConfig(bootstrap_rounds=50))  # quality reads only the names
    assert q["labelled"] == 120 and q["realized_accuracy"] == 1.0
    assert q["labelled_by_source"] == {"organic": 60, "requested-random": 60, "requested-informative": 90}
    assert q["estimation_error"] == pytest.approx(0.8 - 1.0)
    assert predlog.estimation_error(engine, "m:1") == (pytest.approx(0.8 - 1.0), 120)


def test_the_bake_pairs_only_unbiased_items(labelled_log):
    from core import predlog

    engine, _, before = labelled_log
    items = predlog.labelled_after(engine, "m:1", before, 1000)
    assert len(items) == 120 and all(f == "positive" for _, _, f in items)
    assert predlog.labelled_since_count(engine, "m:1", before) == (120, 120)


def test_gate_items_are_unbiased_and_informative_labels_train(labelled_log):
    from core import predlog
    from loop.refine import split_fresh
    from loop.refine_config import RefineConfig

    engine, _, _ = labelled_log
    fresh = predlog.fresh_labelled(engine, "m:1", None, 1000)
    assert {src for *_, src in fresh} == set(predlog.SOURCES) and len(fresh) == 210
    train, gate = split_fresh(fresh, RefineConfig())
    assert gate and all(src in predlog.UNBIASED for *_, src in gate)
    assert sum(1 for *_, src in train if src == predlog.REQUESTED_INFORMATIVE) == 90
    assert len(train) + len(gate) == 210 and not {r[0] for r in train} & {r[0] for r in gate}
    # the policy's count of labels a refinement can train on counts every source
    assert predlog.labelled_count(engine, "m:1") == 210


def test_provenance_is_recorded_and_a_new_answer_replaces_the_old(labelled_log):
    from sqlalchemy import select

    from core import predlog

    engine, ids, _ = labelled_log
    labels = lambda version: LABELS  # noqa: E731
    c = predlog.predictions.c

    def row(rid):
        with engine.connect() as conn:
            return conn.execute(select(c.feedback_label, c.feedback_source, c.feedback_annotator).where(c.request_id == rid)).one()

    assert tuple(row(ids[0])) == ("positive", None, None) or tuple(row(ids[0])) == ("positive", "organic", None)
    assert tuple(row(ids[60])) == ("positive", "requested-random", "ann")
    again = predlog.record_feedback(engine, [(ids[60], "positive")], labels, source=predlog.REQUESTED_RANDOM, annotator="ann")
    assert again[0]["status"] == "unchanged"
    changed = predlog.record_feedback(engine, [(ids[60], "negative")], labels, source=predlog.REQUESTED_RANDOM, annotator="bob")
    assert changed[0]["status"] == "replaced" and tuple(row(ids[60])) == ("negative", "requested-random", "bob")
    with pytest.raises(ValueError, match="unknown label source"):
        predlog.record_feedback(engine, [(ids[0], "positive")], labels, source="made-up")
