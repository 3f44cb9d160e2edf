"""The one way production moves: promote or roll back, checked, fenced and audited in one transaction.

Every caller (the refinement's gate, the controller's bake check, `driftloop models promote` and
`driftloop rollback`, the admin API, `driftloop train --promote`) goes through here, so every move:

1. checks the target (registered, a driftloop model, and for a promotion that it loads and
   predicts, unless forced);
2. in ONE state-DB transaction that holds the alias's write lock: checks the caller's fencing token
   when it acts for a leader (a demoted controller's late write is refused, whatever its child
   process still does), moves the pointer, and writes both trails: `alias_history` (what the
   service follows) and the loop's audit event (`promotion` / `rollback`, what operators read).
   A crash at any moment leaves all three as before or all three moved.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Connection, Engine

from core import alias, audit, inference, registry
from core.errors import DriftloopError
from core.statedb import get_engine

Fence = Callable[[Connection], None]  # raises DriftloopError when the caller's leadership term is over


def _hook(kind: str, details: dict, fence: Fence | None):
    def hook(conn: Connection, _action: str, tag: str, previous: str | None) -> None:
        if fence is not None:
            fence(conn)
        extra = {"previous": previous} if kind == "promotion" else {"to": tag}
        audit.record_in(conn, kind, tag if kind == "promotion" else previous, **extra, **details)
    return hook


def verified_tag(tag: str, force: bool = False) -> str:
    """The canonical tag of a registered driftloop model that loads and predicts (unless `force`)."""
    model = registry.get(tag)
    if not force:
        try:
            inference.load_verified(model.tag, device="cpu")
        except DriftloopError as err:
            raise DriftloopError(f"{err}; not promoted, production unchanged") from None
    return model.tag


def promote(tag: str, *, reason: str, actor: str, engine: Engine | None = None, fence: Fence | None = None,
            force: bool = False, verify: bool = True, **details) -> alias.AliasState:
    """Point production at `tag`; `details` go into the audit event (gate figures, trigger...)."""
    engine = engine or get_engine()
    audit.ensure_schema(engine)
    if verify:
        tag = verified_tag(tag, force)
    return alias.promote(tag, reason=reason, actor=actor, engine=engine,
                         hook=_hook("promotion", {"reason": reason, "actor": actor, **details}, fence))


def rollback(*, to: str | None = None, reason: str, actor: str, engine: Engine | None = None, fence: Fence | None = None,
             **details) -> alias.AliasState:
    """Return production to the model served before the last promotion (or to `to`)."""
    engine = engine or get_engine()
    audit.ensure_schema(engine)
    if to is not None:
        to = registry.get(to).tag
    return alias.rollback(to=to, reason=reason, actor=actor, engine=engine,
                          hook=_hook("rollback", {"reason": reason, "actor": actor, **details}, fence))
