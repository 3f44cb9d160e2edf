"""driftloop's own per-pass figures in Evidently's snapshots, and the dashboard that plots them.

Evidently 0.7 has no metric for what decides the loop (realized and estimated accuracy with their
bounds, the estimate's measured error, labelled rows by provenance, the share of drift tests
rejected after Holm, the serving model's generation), so each pass's snapshot carries them as
`PassValue`s: a `SingleValueMetric` whose only series labels are `name` and `key`; the number
itself is excluded from the labels, or every pass would start a one-point series of its own. A
stored snapshot keeps only results and plain configs, so `evidently ui` plots them without
importing this module (docs/notes/evidently-0.7-panels.md has the evidence, file and line).

The p-values are plotted as −log10 p: the UI's axis is linear and cuts tick labels wider than
45 px, which turned a drifting window's p-values (1e-10 … 4e-4) into ticks reading "0.0…";
−log10 p (0 … 16, clipped at p = 1e-16) reads at a glance, and a constant −log10 alpha line shows
where a single test would reject (Holm's per-test thresholds are stricter). Each snapshot is
tagged `model=<version>`: the chart's tooltip lists it, and the generation series steps at each
promotion.
"""

from __future__ import annotations

import math
from typing import Optional

from evidently._pydantic_compat import Field
from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric
from evidently.sdk.models import PanelMetric
from evidently.sdk.panels import bar_plot_panel, line_plot_panel

P_FLOOR = 1e-16  # −log10 p is clipped at 16: one p that underflowed to 0 would flatten every other point


class PassValue(SingleValueMetric):
    """A number driftloop computed itself; `name` (and `key`, e.g. a test or a label source) label its series."""

    name: str
    key: Optional[str] = None  # noqa: UP045 - Evidently's pydantic v1 models
    value: float = Field(math.nan, exclude=True)


class PassValueCalculation(SingleValueCalculation[PassValue]):
    def calculate(self, context, current_data, reference_data):
        return self.result(self.metric.value)

    def display_name(self) -> str:
        return self.metric.name.replace("_", " ") + (f" ({self.metric.key})" if self.metric.key else "")


QUALITY = ("realized_accuracy", "realized_accuracy_lower", "realized_accuracy_upper",
           "estimated_accuracy", "estimated_accuracy_lower", "estimated_accuracy_upper", "estimation_error")


def _number(x) -> float:
    return math.nan if x is None else float(x)


def values(quality: dict, tests: list, alpha: float, generation: int | None) -> list[PassValue]:
    """The pass's figures as PassValues. NaN where unknown (too few labels): the pass keeps its place
    on the x-axis and the line shows a gap, where leaving the value out would drop the pass."""
    out = [PassValue(name=name, value=_number(quality.get(name))) for name in QUALITY]
    out.append(PassValue(name="labelled", value=float(quality.get("labelled") or 0)))
    out += [PassValue(name="labelled_rows", key=source, value=float(n)) for source, n in sorted((quality.get("labelled_by_source") or {}).items())]
    if tests:
        out.append(PassValue(name="drifted_share", value=sum(bool(t.drift) for t in tests) / len(tests)))
        out += [PassValue(name="neg_log10_p", key=t.name, value=-math.log10(max(float(t.p_value), P_FLOOR))) for t in tests]
    out.append(PassValue(name="neg_log10_p", key="alpha (one test alone)", value=-math.log10(alpha)))
    if generation is not None:
        out.append(PassValue(name="model_generation", value=float(generation)))
    return out


def _series(*names: str) -> list[PanelMetric]:
    return [PanelMetric(legend=name.replace("_", " "), metric="PassValue", metric_labels={"name": name}) for name in names]


def dashboard_panels() -> list:
    """The project's panels, in the order an on-call engineer reads them."""
    return [
        line_plot_panel(title="Accuracy per pass: realized (95 % Wilson bounds) and estimated (95 %)",
                        description="Realized: the window's unbiased labels (gaps: fewer than policy.min_labels). Estimated: "
                                    "mean calibrated confidence, no labels needed.",
                        values=_series(*QUALITY[:6])),
        line_plot_panel(title="The estimate's error on labelled rows (estimated − realized)",
                        description="How far the label-free estimate was off where labels exist; the policy corrects by it.",
                        values=_series("estimation_error")),
        bar_plot_panel(title="Labelled rows in the window, by provenance", stacked=True,
                       description="organic: /feedback; requested-random: the unbiased sample; requested-informative: "
                                   "training only (never measures accuracy).",
                       values=[PanelMetric(legend="{{key}}", metric="PassValue", metric_labels={"name": "labelled_rows"})]),
        line_plot_panel(title="Share of drift tests rejected (Holm)",
                        description="0: no test rejects; the pass reports drift when any does.",
                        values=_series("drifted_share")),
        line_plot_panel(title="Drift tests: −log10 p per test (higher = further from the reference)",
                        description="2 is p = 0.01, 6 is p = 1e-6; clipped at 16. The alpha line is where one test alone "
                                    "would reject; Holm's thresholds are stricter. Every test is in each pass's report.",
                        values=[PanelMetric(legend="{{key}}", metric="PassValue", metric_labels={"name": "neg_log10_p"})]),
        line_plot_panel(title="Serving model generation (steps at each promotion; the tooltip names the model)",
                        values=_series("model_generation")),
    ]


# titles of panels earlier versions made, replaced by the ones above
RETIRED = frozenset({"Drift tests: p-value per monitor pass"})


def sync_dashboard(ws, project) -> bool:
    """Make the project's dashboard hold driftloop's panels: add the missing ones, update changed
    definitions in place (same id, same tab), drop retired ones, leave panels users added. Keyed by
    title (every panel gets a fresh id). Returns whether it changed anything. Not `delete_panel`:
    it keeps only the panels of one tab."""
    from evidently.sdk.models import DashboardTabModel  # noqa: PLC0415

    model = project.dashboard.model()
    wanted = {p.title: p for p in dashboard_panels()}
    changed = False
    drop = {p.id for p in model.panels if p.title in RETIRED}
    if drop:
        model.panels = [p for p in model.panels if p.id not in drop]
        for tab in model.tabs:
            tab.panels = [i for i in tab.panels if i not in drop]
        changed = True
    for i, panel in enumerate(model.panels):
        want = wanted.pop(panel.title, None)
        if want is not None and want.dict(exclude={"id"}) != panel.dict(exclude={"id"}):
            model.panels[i] = want.copy(update={"id": panel.id})
            changed = True
    for want in wanted.values():
        model.panels.append(want)
        if not model.tabs:
            model.tabs.append(DashboardTabModel(title="General", panels=[]))
        model.tabs[0].panels.append(want.id)
        changed = True
    if changed:
        ws.save_dashboard(project.id, model)
    return changed
