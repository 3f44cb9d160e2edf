import pytest

from core import alias
from core.errors import DriftloopError


def test_promote_and_stacked_rollbacks(db_url):
    assert alias.current() is None
    alias.promote("m:1")
    alias.promote("m:2")
    state = alias.promote("m:3", reason="better")
    assert (state.tag, state.previous_tag, state.version) == ("m:3", "m:2", 3)
    assert alias.rollback().tag == "m:2"
    back = alias.rollback()
    assert back.tag == "m:1" and back.previous_tag is None
    with pytest.raises(DriftloopError, match="first production model"):
        alias.rollback()
    actions = [h["action"] for h in alias.history()]
    assert actions == ["rollback", "rollback", "promote", "promote", "promote"]


def test_rollback_to_a_named_model_and_errors(db_url):
    with pytest.raises(DriftloopError, match="no production model"):
        alias.rollback()
    alias.promote("m:1")
    with pytest.raises(DriftloopError, match="already"):
        alias.promote("m:1")
    alias.promote("m:2")
    alias.promote("m:3")
    assert alias.rollback(to="m:1").tag == "m:1"


def test_alias_survives_a_new_engine(db_url):
    from core.statedb import dispose_engines

    alias.promote("m:7")
    dispose_engines()
    assert alias.current().tag == "m:7"
