"""The controller's page for people: `GET /`, and `/status` when a browser asks for text/html.

An on-call engineer opening the controller at 3 a.m. needs, in ten seconds: which model serves and
where it came from (its chain of parents across generations, each with the trigger, the gate and
its held-out figures), what the monitor last saw, what the loop is waiting for (labels, cooldown,
the bake), and why it did what it did (the audit trail, with reasons). All of it is in the state DB;
`/status` keeps serving the same facts as JSON to API clients.

Server-rendered with Jinja2 (installed with our dependencies), autoescaped: every value that came
from a model's lineage, an audit reason or a label is text on the page, never markup. No
JavaScript: the page is a snapshot (reload to refresh; it says when it was made).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from core import audit, registry
from core.errors import DriftloopError
from loop.gate import summary_line

TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True),
                   trim_blocks=True, lstrip_blocks=True)
CHAIN_LIMIT = 20  # generations shown; older ones are named by the last parent shown


def short_tag(tag: str | None) -> str:
    """`driftloop-classifier:o6rv4jxnukc56ax4` → `driftloop-classifier:o6rv4jxn…` (the full tag goes in a title)."""
    if not tag:
        return "-"
    name, _, version = tag.partition(":")
    return f"{name}:{version[:8]}…" if len(version) > 10 else tag


def when(iso: str | dt.datetime | None, now: dt.datetime) -> str:
    """UTC time with its age: `2026-12-04 12:03:11 UTC (3 min ago)`."""
    if not iso:
        return "-"
    at = iso if isinstance(iso, dt.datetime) else dt.datetime.fromisoformat(str(iso))
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return f"{at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({age(at, now)})"


def age(at: dt.datetime, now: dt.datetime) -> str:
    seconds = (now - at).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds / size:.0f} {unit}"
            break
    else:
        text = f"{seconds:.0f} s"
    return f"in {text}" if ahead else f"{text} ago"


def pvalue(p) -> str:
    """p-values a person can compare: scientific below 0.001, three decimals above."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def number(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def event_detail(e: dict) -> str:
    """One line for an audit event: the reason it carries (the same line `driftloop history` prints)."""
    if e["kind"] == "gate":
        return summary_line(e)
    if e["kind"] == "promotion":
        return f"replaces {e['previous']} ({e.get('reason') or 'promoted'})" if e.get("previous") else \
            f"first production model ({e.get('reason') or 'promoted'})"
    return str(e.get("reason") or e.get("trigger") or "; ".join(e.get("reasons") or []) or e.get("error") or "")


def lineage_chain(tag: str | None, gates: dict[str, dict], limit: int = CHAIN_LIMIT) -> list[dict]:
    """The serving model and its parents, newest first: tag, generation, created, trigger, the gate
    it passed (from the audit trail) and its held-out figures (reference accuracy, suite parts)."""
    chain, seen = [], set()
    while tag and tag not in seen and len(chain) < limit:
        seen.add(tag)
        try:
            model = registry.get(tag)
        except DriftloopError:
            chain.append({"tag": tag, "missing": True})
            break
        lin = model.lineage
        refinement = lin.get("refinement") or {}
        reference = lin.get("reference") or {}
        chain.append({
            "tag": tag, "parent": lin.get("parent"), "created": model.creation_time,
            "generation": (lin.get("data_lineage") or {}).get("generation", 0),
            "trigger": refinement.get("trigger") or ("trained: " + str((lin.get("config") or {}).get("data", {}).get("path", ""))),
            "gate": gates.get(tag), "reference_accuracy": reference.get("accuracy"), "reference_n": reference.get("n"),
            "reference_source": reference.get("source"), "parts": lin.get("suite_accuracy_by_part") or [],
        })
        tag = lin.get("parent")
    return chain


def wants_html(accept: str) -> bool:
    """A browser (text/html before any JSON in Accept); API clients and curl keep getting JSON."""
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "text/html" in kinds and ("application/json" not in kinds or kinds.index("text/html") < kinds.index("application/json"))


def policy_view(engine, snapshot: dict, policy) -> dict:
    """What the loop is doing and what it waits for, in lines a person reads: the refinement running,
    the bake, the drift streak against the K passes it needs, the cooldown, the last decision, labels."""
    from loop.policy import PolicyConfig  # noqa: PLC0415 - typing only at run time
    from monitoring import store  # noqa: PLC0415

    policy = policy if isinstance(policy, PolicyConfig) else PolicyConfig()
    now = dt.datetime.now(dt.timezone.utc)
    waiting: list[str] = []
    latest = snapshot.get("last_monitor_pass") or {}
    streak = store.consecutive_drift(engine, latest["model_version"]) if latest.get("model_version") else 0
    bake = snapshot.get("bake")
    if snapshot.get("refine_running"):
        state = "refining"
        waiting.append("a refinement is running: its gate decides")
    elif bake:
        state = "baking the new champion"
        waiting.append(f"bake: {bake.get('labelled_items_with_text', 0)} of {bake.get('needed')} labelled items since the promotion "
                       f"({bake.get('state')})")
    elif streak:
        state = "watching a drift streak"
    else:
        state = "watching"
    if policy.mode in ("drift", "drift_and_performance"):
        waiting.append(f"drift in {streak} consecutive passes (retrains from {policy.consecutive_windows})")
    started = audit.last(engine, "retrain_started")
    if started and policy.cooldown_s:
        until = dt.datetime.fromisoformat(started["at"]) + dt.timedelta(seconds=policy.cooldown_s)
        if until > now:
            waiting.append(f"cooldown until {when(until, now)}")
    decision = audit.last(engine, "policy")
    if decision:
        waiting.append(f"last decision {age(dt.datetime.fromisoformat(decision['at']), now)}: {decision.get('action')}: "
                       f"{decision.get('reason')}")
    labels = snapshot.get("labels") or {}
    if labels.get("asked"):
        waiting.append(f"label requests: {labels.get('pending', 0)} pending, {labels.get('sent', 0)} with annotators, "
                       f"{labels.get('budget_left_today')} of {labels.get('budget_per_day')} left today")
    return {"state": state, "waiting": waiting, "streak": streak}


def render(status: dict, *, chain: list[dict], events: list[dict], links: dict[str, str | None], policy: dict,
           now: dt.datetime | None = None) -> str:
    """The page, from what /status answers plus the lineage chain, the last events and the links."""
    now = now or dt.datetime.now(dt.timezone.utc)
    template = _env.get_template("status.html")
    return template.render(s=status, chain=chain, events=events, links=links, policy=policy, now=now,
                           short_tag=short_tag, when=lambda iso: when(iso, now), pvalue=pvalue, number=number,
                           event_detail=event_detail, report_name=lambda p: Path(p).name if p else None)
