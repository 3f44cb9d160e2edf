"""The loop's last step, fast and real: a refinement whose gate passes promotes its challenger, the
production alias moves with the promotion's audit event, and the lineage says why.

The default base model (MiniLM, bundled) on the demo data: a champion trained on product reviews,
then 200 market-news predictions logged with their true labels (the champion was never taught that
domain), then `driftloop refine` with the controller's defaults except the margin the demo uses (its
suite is 240 reviews, too few to bound 2 points: README "The closed loop"). Nothing about the gate is
stubbed: whether it passes is measured, and the test fails if it does not."""

from __future__ import annotations

from tests.conftest import DEMO, cli_json
from tests.traffic import log_traffic


def _rows(name: str) -> list[tuple[str, str]]:
    lines = (DEMO / name).read_text(encoding="utf-8").splitlines()[1:]
    return [(line.split("\t")[0], line.split("\t")[1]) for line in lines if line.strip()]


def test_a_refinement_whose_gate_passes_is_promoted_automatically(tmp_path):
    import os

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    champion = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--epochs", "1", "--quiet", "--promote", "always",
                         "--set", "report=false", "--set", "data.val_fraction=0.4"], home)["model"]
    log_traffic(env, champion, _rows("markets.tsv")[:200], feedback=True)

    out = cli_json(["refine", "--quiet", "--set", "gate.epsilon=0.05", "--set", "epochs=1"], home, timeout=900)
    gate = out["gate"]
    assert gate["passed"], gate["reasons"]
    assert out["promoted"] is True and out["champion"] == champion
    challenger = out["challenger"]
    assert cli_json(["status"], home)["champion"] == challenger
    promotion = cli_json(["history", "--kind", "promotion"], home)["events"][0]
    assert promotion["model_version"] == challenger and "refinement gate passed" in str(promotion)
    lineage = cli_json(["models", "show", challenger], home)["lineage"]
    assert lineage["parent"] == champion and lineage["reference"]["n"] == gate["fresh_n"]
    assert [p["name"] for p in lineage["suite_accuracy_by_part"]] == ["g0", "g1"]
