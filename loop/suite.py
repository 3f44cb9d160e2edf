"""The cumulative regression suite, kept by part: which generation and which shift each item came from.

The gate's promise is per domain: a challenger is at least as good as its champion on *every* domain
the line of models has seen, not only on the suite as a whole. A pooled test bounds the average
loss: a domain that makes up 9 % of the suite could lose ~22 points on its own while a pooled
2-point margin holds. So the suite is stored as a list of rows plus, in the model's lineage, its
parts in order (`data_lineage.regression_suite_parts`: name, generation, domain, n):

- part `g0`: generation 0's validation rows (the first domain);
- part `g<k>`: the gate items of the refinement that made generation k (the shift it adapted to),
  added when that generation is made (the rows of a challenger that is never promoted are never
  anybody's suite).

**How a part grows, and why a cap.** A part is made once, from one generation's held-out rows, and
never changes afterwards; a later return of the same domain makes a new part (its own shift, its
own items), so the suite grows by one part per generation. Each part is cut to `part_cap` items by a
seeded uniform sample (what a reservoir sample of the part's stream would keep, since the part is
complete when made): showing non-inferiority at margin ε on a part whose models disagree on a share
r of items takes n ≥ r (z_α + z_0.8)² / ε² items (`paired.noninferiority_n`: 619 at ε = 0.02,
α = 0.05, r = 4 %), and the default cap of 1,000 keeps enough for that with room (r up to 6.5 %),
while bounding what every later gate scores per generation. Parts are never merged: pooling two
generations' items would hide a forgotten one inside the other.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from core.data_store import Row


@dataclass(frozen=True)
class Part:
    name: str  # "g0", "g1", ...
    generation: int
    domain: str  # what the items are: the first model's data, or the shift a refinement adapted to
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def parts_of(lineage: dict, rows: int) -> list[Part]:
    """The parts of a model's suite of `rows` rows, from its lineage. A suite stored before parts
    were recorded becomes one part per known block (`{"inherited": a, "gate_items": b}`), or one part."""
    data_lineage = lineage.get("data_lineage") or {}
    stored = data_lineage.get("regression_suite_parts")
    generation = int(data_lineage.get("generation") or 0)
    if isinstance(stored, list) and sum(int(p["n"]) for p in stored) == rows:
        return [Part(str(p["name"]), int(p["generation"]), str(p.get("domain") or ""), int(p["n"])) for p in stored]
    if isinstance(stored, dict) and int(stored.get("inherited", 0)) + int(stored.get("gate_items", 0)) == rows:
        parts = [Part("inherited", 0, "suite stored before parts were recorded", int(stored["inherited"]))]
        if stored.get("gate_items"):
            parts.append(Part(f"g{generation}", generation, "gate items", int(stored["gate_items"])))
        return [p for p in parts if p.n]
    return [Part(f"g{generation}" if generation == 0 else "suite", generation, "suite stored before parts were recorded", rows)] if rows else []


def split(rows: list[Row], parts: list[Part]) -> list[tuple[Part, list[Row]]]:
    """Each part with its rows (parts are consecutive blocks of the suite, in order)."""
    out, start = [], 0
    for part in parts:
        out.append((part, rows[start:start + part.n]))
        start += part.n
    return out


def keep_labels(rows: list[Row], parts: list[Part], label_names: list[str]) -> tuple[list[Row], list[Part]]:
    """The suite without rows of labels the model does not know, parts recounted (a part left empty goes)."""
    names = set(label_names)
    kept_rows, kept_parts = [], []
    for part, block in split(rows, parts):
        block = [(t, y) for t, y in block if y in names]
        if block:
            kept_rows += block
            kept_parts.append(Part(part.name, part.generation, part.domain, len(block)))
    return kept_rows, kept_parts


def extend(rows: list[Row], parts: list[Part], new: list[Row], generation: int, domain: str, part_cap: int,
           seed: int | str = 0) -> tuple[list[Row], list[Part]]:
    """The suite with `new` appended as generation `generation`'s part, cut to `part_cap` items by a
    seeded uniform sample (kept in their original order)."""
    if len(new) > part_cap:
        picked = sorted(random.Random(f"suite:{seed}:{generation}").sample(range(len(new)), part_cap))
        new = [new[i] for i in picked]
    if not new:
        return list(rows), list(parts)
    return list(rows) + list(new), list(parts) + [Part(f"g{generation}", generation, domain, len(new))]
