"""Loading, cleaning, label mapping, splitting and fingerprinting labelled text.

Every way data enters driftloop passes through here, so every failure a user can cause (missing
file or column, bad bytes, one class left...) becomes one ``DriftloopError`` line, and every row
dropped is counted and reported rather than silently lost.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from core.errors import DriftloopError

TEXT_COLUMN_CANDIDATES = ("text", "sentence")
DEMO_DOMAINS = ("reviews", "markets")


@dataclass
class Split:
    """Texts with integer labels (indices into the label names)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self, n_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=int), minlength=n_classes).tolist()


@dataclass
class PreparedData:
    """Cleaned, label-mapped and split data, plus what cleaning did and a fingerprint."""

    train: Split
    val: Split
    test: Split | None
    label_names: list[str]
    cleaning: dict[str, dict[str, int]] = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """sha256 over the normalised rows of every split, plus counts per split and class."""
        digest = hashlib.sha256()
        counts: dict[str, dict] = {}
        for name, split in self.splits().items():
            rows = sorted(f"{name}\t{self.label_names[y]}\t{t}" for t, y in zip(split.texts, split.labels))
            for row in rows:
                digest.update(row.encode("utf-8") + b"\n")
            counts[name] = {"rows": len(split), "per_class": dict(zip(self.label_names, split.class_counts(len(self.label_names))))}
        return {"sha256": digest.hexdigest(), "splits": counts}

    def splits(self) -> dict[str, Split]:
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out


# --------------------------------------------------------------------------- reading


def demo_path(domain: str) -> Path:
    """Path of one of the project's own demo files (`demo:reviews`, `demo:markets`)."""
    if domain not in DEMO_DOMAINS:
        raise DriftloopError(f"unknown demo dataset {domain!r}; choose one of {', '.join(DEMO_DOMAINS)}")
    return Path(str(importlib.resources.files("finetune.demo_data") / f"{domain}.tsv"))


def _read_hf(spec: str) -> pd.DataFrame:
    """`hf:<name>[:<config>][@<split>]` through the optional `datasets` package (needs network or cache)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise DriftloopError("hf: datasets need the optional dependency: pip install 'driftloop[hf]'") from None
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # noqa: BLE001 - any failure of a remote load is the user's to fix
        raise DriftloopError(f"cannot load Hugging Face dataset {spec!r}: {str(err).splitlines()[0]}") from None
    return ds.to_pandas()


def _read_delimited(path: Path, sep: str, text_column: str | None, label_column: str) -> pd.DataFrame:
    kwargs = {"sep": sep, "encoding": "utf-8", "dtype": str, "keep_default_na": False}
    if sep == "\t":
        kwargs["quoting"] = csv.QUOTE_NONE  # SST-2 style: quotes are literal characters
    df = pd.read_csv(path, **kwargs)
    wanted = [text_column or "sentence", label_column]
    # Headerless two-column files (`sentence<TAB>label`, as the UCI sets): re-read without a header.
    if len(df.columns) == 2 and not set(wanted) <= set(df.columns) and _looks_like_label(df.columns[1]):
        df = pd.read_csv(path, header=None, names=wanted, **kwargs)
    return df


def _looks_like_label(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return value.strip().lower() in {"positive", "negative", "neutral", "pos", "neg"}


def read_table(source: str, text_column: str | None, label_column: str) -> pd.DataFrame:
    """Read a file (by extension), a demo set or an HF dataset into a DataFrame."""
    if source.startswith("demo:"):
        path = demo_path(source[len("demo:"):])
    elif source.startswith("hf:"):
        return _read_hf(source)
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise DriftloopError(f"data file not found: {path}")
    if path.is_dir():
        raise DriftloopError(f"data path is a directory, not a file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _read_delimited(path, ",", text_column, label_column)
        if suffix in {".tsv", ".txt", ".tab"}:
            return _read_delimited(path, "\t", text_column, label_column)
        if suffix in {".jsonl", ".json", ".ndjson"}:
            return pd.read_json(path, lines=suffix != ".json", encoding="utf-8", dtype=False)
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DriftloopError(f"{path} is not valid UTF-8 (bad byte at offset {err.start}); re-encode it as UTF-8") from None
    except (pd.errors.ParserError, ValueError, OSError) as err:
        raise DriftloopError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    raise DriftloopError(f"unsupported data format {suffix!r} for {path}: use .csv, .tsv/.txt, .jsonl or .parquet")


def resolve_text_column(df: pd.DataFrame, text_column: str | None, source: str) -> str:
    if text_column:
        if text_column not in df.columns:
            raise DriftloopError(f"text column {text_column!r} not found in {source}; columns: {', '.join(map(str, df.columns))}")
        return text_column
    for candidate in TEXT_COLUMN_CANDIDATES:
        if candidate in df.columns:
            return candidate
    raise DriftloopError(f"no text column in {source} (looked for {', '.join(TEXT_COLUMN_CANDIDATES)}); pass --text-column; columns: {', '.join(map(str, df.columns))}")


# --------------------------------------------------------------------------- cleaning


def _label_key(value) -> str:
    """Canonical string for a label: 1, 1.0 and "1" are the same class; strings are stripped."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    try:
        number = float(text)
        if number.is_integer():
            return str(int(number))
    except ValueError:
        pass
    return text


def clean(df: pd.DataFrame, text_column: str, label_column: str, source: str, max_chars: int, deduplicate: bool) -> tuple[pd.DataFrame, dict[str, int]]:
    """Strip, drop empty/NaN, cut over-long texts, de-duplicate; returns rows and counts."""
    if label_column not in df.columns:
        raise DriftloopError(f"label column {label_column!r} not found in {source}; columns: {', '.join(map(str, df.columns))}")
    stats = {"read": len(df)}
    out = pd.DataFrame({"text": df[text_column], "label": df[label_column]})
    out = out[out["text"].notna() & out["label"].notna()]
    out["text"] = out["text"].astype(str).str.strip()
    out["label"] = out["label"].map(_label_key)
    keep = (out["text"] != "") & (out["label"] != "") & (out["text"].str.lower() != "nan")
    stats["dropped_empty"] = int(stats["read"] - keep.sum())
    out = out[keep]
    too_long = out["text"].str.len() > max_chars
    stats["cut_to_max_chars"] = int(too_long.sum())
    out.loc[too_long, "text"] = out.loc[too_long, "text"].str.slice(0, max_chars)
    if deduplicate:
        before = len(out)
        out = out.drop_duplicates(subset="text", keep="first")
        stats["dropped_duplicates"] = before - len(out)
    stats["kept"] = len(out)
    if out.empty:
        raise DriftloopError(f"no usable rows in {source} after cleaning ({stats['read']} read, {stats['dropped_empty']} empty)")
    return out.reset_index(drop=True), stats


def label_order(keys: list[str]) -> list[str]:
    """Numeric labels in numeric order, anything else alphabetically: stable across runs."""
    if all(k.lstrip("-").isdigit() for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


# --------------------------------------------------------------------------- splitting and sampling


def _stratified_take(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if n >= len(df):
        return df
    counts = df["label"].value_counts()
    stratify = df["label"] if counts.min() >= 2 and n >= len(counts) else None
    taken, _ = train_test_split(df, train_size=n, stratify=stratify, random_state=seed)
    return taken.reset_index(drop=True)


def prepare(
    source: str,
    *,
    test_source: str | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    max_rows: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 42,
    max_chars: int = 10_000,
    deduplicate: bool = True,
    label_names: list[str] | None = None,
) -> PreparedData:
    """Read, clean, map labels and split into train/val (stratified), plus an optional test set.

    ``label_names`` fixes the label order (refinements must keep their parent's head layout).
    """
    raw = read_table(source, text_column, label_column)
    col = resolve_text_column(raw, text_column, source)
    df, stats = clean(raw, col, label_column, source, max_chars, deduplicate)
    if max_rows is not None and len(df) > max_rows:
        df = _stratified_take(df, max_rows, seed)
        stats["sampled_to"] = len(df)
    found = label_order(df["label"].unique().tolist())
    if label_names is None:
        if len(found) < 2:
            raise DriftloopError(f"{source} has a single class ({found[0]!r}) after cleaning; a classifier needs at least two")
        label_names = found
    else:
        unknown = sorted(set(found) - set(label_names))
        if unknown:
            raise DriftloopError(f"{source} has labels the model does not know: {', '.join(unknown)} (known: {', '.join(label_names)})")
    index = {name: i for i, name in enumerate(label_names)}
    counts = df["label"].value_counts()
    rare = counts[counts < 2]
    if len(rare):
        raise DriftloopError(f"class {rare.index[0]!r} has a single example in {source}; each class needs at least 2 for a stratified split")
    n_val = max(len(counts), int(round(len(df) * val_fraction)))
    if len(df) - n_val < len(counts):
        raise DriftloopError(f"{source} has only {len(df)} usable rows: too few to split into train and validation")
    train_df, val_df = train_test_split(df, test_size=n_val, stratify=df["label"], random_state=seed)
    cleaning = {"train": stats}
    test = None
    if test_source:
        traw = read_table(test_source, text_column, label_column)
        tdf, tstats = clean(traw, resolve_text_column(traw, text_column, test_source), label_column, test_source, max_chars, deduplicate)
        unseen = sorted(set(tdf["label"]) - set(label_names))
        if unseen:
            raise DriftloopError(f"test set {test_source} has labels never seen in training: {', '.join(unseen)} (training labels: {', '.join(label_names)})")
        cleaning["test"] = tstats
        test = Split(tdf["text"].tolist(), [index[v] for v in tdf["label"]])
    return PreparedData(
        train=Split(train_df["text"].tolist(), [index[v] for v in train_df["label"]]),
        val=Split(val_df["text"].tolist(), [index[v] for v in val_df["label"]]),
        test=test,
        label_names=list(label_names),
        cleaning=cleaning,
    )


# --------------------------------------------------------------------------- training-set transforms


def oversample(split: Split, seed: int) -> Split:
    """Repeat random minority-class rows until every class has as many rows as the largest."""
    rng = random.Random(seed)
    labels = np.asarray(split.labels)
    target = np.bincount(labels).max()
    texts, ys = list(split.texts), list(split.labels)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls).tolist()
        for _ in range(target - len(members)):
            i = rng.choice(members)
            texts.append(split.texts[i])
            ys.append(int(cls))
    return Split(texts, ys)


def eda_augment(text: str, rng: random.Random, p_delete: float = 0.1, n_swaps: int = 1) -> str:
    """Easy Data Augmentation without a thesaurus: random word deletion and swaps (Wei & Zou, 2019)."""
    words = text.split()
    if len(words) < 3:
        return text
    kept = [w for w in words if rng.random() > p_delete] or [rng.choice(words)]
    for _ in range(n_swaps):
        if len(kept) > 1:
            i, j = rng.sample(range(len(kept)), 2)
            kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


def augment(split: Split, copies: int, seed: int) -> Split:
    """Append ``copies`` EDA variants of every training row (validation and test stay untouched)."""
    rng = random.Random(seed)
    texts, ys = list(split.texts), list(split.labels)
    for _ in range(copies):
        for t, y in zip(split.texts, split.labels):
            variant = eda_augment(t, rng)
            if variant != t:
                texts.append(variant)
                ys.append(y)
    return Split(texts, ys)
