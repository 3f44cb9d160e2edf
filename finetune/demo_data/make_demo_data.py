"""Writes driftloop's own demo dataset: two domains of short labelled sentences.

The sentences are composed from templates written for this project (no third-party data), so the
demo runs out of the box, offline, in seconds. Two domains give the demo its story:

* ``reviews.tsv`` — product reviews: the domain the first model is trained on;
* ``markets.tsv`` — market news: sentiment carried by domain words ("cut jobs", "raised its
  forecast") that a reviews model reads poorly, i.e. a *harmful* shift that refinement fixes.

Run ``python -m finetune.demo_data.make_demo_data`` to regenerate; output is deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent

PRODUCTS = [
    "the headphones", "this blender", "the laptop", "my new phone", "the coffee maker", "this vacuum",
    "the running shoes", "the backpack", "this keyboard", "the desk lamp", "the air fryer", "the tent",
    "this charger", "the smartwatch", "the camera", "the office chair", "this kettle", "the speaker",
]
REVIEW_POS = [
    "works perfectly", "exceeded my expectations", "is worth every penny", "feels solid and well made",
    "arrived quickly and works great", "is the best purchase I made this year", "is comfortable to use",
    "has a battery that lasts for days", "does exactly what it promises", "is quiet and reliable",
    "looks even better than the pictures", "was easy to set up", "still works like new after months",
]
REVIEW_NEG = [
    "stopped working after a week", "is a waste of money", "feels cheap and flimsy",
    "broke the second time I used it", "never charged properly", "is much louder than advertised",
    "arrived damaged and support never answered", "overheats within minutes", "is uncomfortable to use",
    "looks nothing like the pictures", "was a nightmare to set up", "fell apart after a month",
    "has a battery that dies in an hour",
]
REVIEW_PREFIX = ["", "Honestly, ", "Overall ", "I think ", "After two weeks, ", "To be fair, ", "Sadly, ", "Wow, "]
REVIEW_SUFFIX = ["", ".", "!", " so far.", " in my experience.", " for the price."]

COMPANIES = [
    "Norvik Shipping", "Alder Foods", "Kestrel Telecom", "Brightmoor Energy", "Halden Paper",
    "Sola Retail", "Vantor Steel", "Oakridge Pharma", "Lumen Bank", "Tarsus Logistics",
    "Cobalt Mining", "Fenwick Insurance", "Mistral Airlines", "Pinecrest Construction",
]
MARKET_POS = [
    "raised its full-year profit forecast", "reported a {n} % rise in net sales",
    "won a contract worth EUR {m} million", "swung to an operating profit", "increased its dividend",
    "said orders grew {n} % from a year earlier", "beat analysts' earnings estimates",
    "expanded its production capacity", "cut its net debt by {n} %", "saw its shares rise {n} %",
    "agreed to acquire a rival at a premium", "reported record quarterly revenue",
]
MARKET_NEG = [
    "cut its full-year profit forecast", "reported a {n} % drop in net sales", "lost a contract worth EUR {m} million",
    "swung to an operating loss", "suspended its dividend", "said orders fell {n} % from a year earlier",
    "missed analysts' earnings estimates", "will lay off {m} employees", "saw its shares fall {n} %",
    "issued a profit warning", "wrote down assets worth EUR {m} million", "closed two factories",
]
MARKET_PREFIX = ["", "In {q}, ", "According to the company, ", "On Tuesday, ", "Shares reacted as ", "In a statement, "]
MARKET_SUFFIX = [".", " , the company said .", " in the third quarter.", " in its interim report.", "."]


def _compose(rng: random.Random, subjects, pos, neg, prefixes, suffixes, n: int) -> list[tuple[str, str]]:
    rows: set[tuple[str, str]] = set()
    while len(rows) < n:
        label = "positive" if rng.random() < 0.5 else "negative"
        phrase = rng.choice(pos if label == "positive" else neg)
        phrase = phrase.format(n=rng.randint(2, 40), m=rng.randint(5, 900))
        prefix = rng.choice(prefixes).format(q=rng.choice(["Q1", "Q2", "Q3", "the first half"]))
        subject = rng.choice(subjects)
        if prefix and not prefix.endswith(" "):
            prefix += " "
        text = f"{prefix}{subject if prefix else subject[0].upper() + subject[1:]} {phrase}{rng.choice(suffixes)}"
        rows.add((" ".join(text.split()), label))
    return sorted(rows)


def write(directory: Path = HERE, n: int = 600, seed: int = 7) -> None:
    """Write both domains as TSV files with a ``sentence<TAB>label`` header."""
    rng = random.Random(seed)
    domains = {
        "reviews.tsv": _compose(rng, PRODUCTS, REVIEW_POS, REVIEW_NEG, REVIEW_PREFIX, REVIEW_SUFFIX, n),
        "markets.tsv": _compose(rng, COMPANIES, MARKET_POS, MARKET_NEG, MARKET_PREFIX, MARKET_SUFFIX, n),
    }
    for name, rows in domains.items():
        rng.shuffle(rows)
        with open(directory / name, "w", encoding="utf-8") as fh:
            fh.write("sentence\tlabel\n")
            fh.writelines(f"{text}\t{label}\n" for text, label in rows)


if __name__ == "__main__":
    write()
