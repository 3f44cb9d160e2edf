"""Forget on request (GDPR art. 17): erase one customer's texts from everything driftloop keeps.

A customer names their predictions by request id (the service answers each prediction with one) or
their text by its sha256 (what the log keeps even in hash-only mode). Their text can sit in:

- the prediction log (`predictions`, and `prediction_raw` for its text and embedding): the row
  itself, with text, embedding and feedback. Deleted,
  all matching rows in one transaction (`DELETE ... RETURNING`, so what was deleted is exactly what
  is reported). Holds do not protect a row from this: a legal erasure outranks a refinement's wish
  to keep its rows. On SQLite the transaction runs with `secure_delete`, so the freed pages are
  zeroed rather than left readable in the file, and the WAL is truncated afterwards (best effort:
  a reader of an old snapshot can delay that); on Postgres the dead tuples stay in the table files
  until (auto)vacuum reclaims them, which is reported.
  A text hash has no index in the log (core/predlog.py), so `--text-sha256` reads the whole log
  once, outside any write lock (WAL readers do not block the service); the transaction then deletes
  those rows by id, plus any row logged with that hash since the scan, an id range of seconds.
- the dataset store (core/data_store.py): every training split, replay mix and regression suite
  a model was made from, as `<sha256>.jsonl` files. A line matches when the sha256 of its text
  (utf-8) is one of the hashes being forgotten (for a request id: its row's `text_sha256`). The
  file name is the hash of its bytes and lineages pin that name, so a file cannot be edited, only
  deleted: it is deleted when no *served* model (one in the production alias's history, still in
  the model store) needs it; needs are every dataset name in that model's lineage (own, mix,
  regression suite, a config's data path) and the `own` rows of its ancestors in the store, which a
  refinement of it replays (loop/refine.py). A file a served model needs is kept and reported with
  what to do: delete those models from the store first, then forget again. Files go after the
  rows' transaction has committed: a crash in between leaves files that a second run deletes.
- a model's reference profile (`reference.parquet` and the per-runtime copies under `runtimes/` in
  its store directory): a refinement profiles the champion's newest traffic, so a challenger can
  carry customer texts. Those files are checksummed into the model's manifest and the model is
  immutable in the store, so they are reported (model, file, rows), never edited.

Nothing else holds raw texts: the monitor's Evidently reports and workspace snapshots are built
from the prediction, the confidence, the class probabilities and the text descriptors only
(monitoring/analysis.py `_evidently_drift`; `add_run(..., include_data=False)` in
monitoring/passes.py), the monitor's windows never read the text column (`predlog.window_rows`),
the audit trail records counts and ids, and training reports show metrics and plots. Backups and
copies of the state DB or the model store made outside driftloop are out of its reach.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection, Engine

from core import audit, data_store, predlog, registry, retention
from core.alias import PRODUCTION, alias_history
from core.alias import ensure_schema as ensure_alias_schema
from core.errors import DriftloopError
from core.home import bentoml_home
from core.predlog import predictions

HEX64 = re.compile(r"[0-9a-f]{64}")
HEX64_ANYWHERE = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
MAX_REQUEST_ID = 64  # what the service accepts as a request id (service/service.py RequestId)
CHUNK = 500  # ids per IN (...) list: far below SQLite's and Postgres's parameter limits


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Selection:
    """What to forget: request ids and text hashes (lower-case hex), each once, in the order given."""

    request_ids: tuple[str, ...]
    text_hashes: tuple[str, ...]


def parse_selection(request_ids: Iterable[str] | None, text_hashes: Iterable[str] | None) -> Selection:
    """Check the selectors and normalise them; a bad one is one clear line (DriftloopError)."""
    ids = list(dict.fromkeys(r.strip() for r in request_ids or []))
    hashes = list(dict.fromkeys(h.strip().lower() for h in text_hashes or []))
    if not ids and not hashes:
        raise DriftloopError("say what to forget: --request-id ID or --text-sha256 HEX (each repeatable)")
    for rid in ids:
        if not rid or len(rid) > MAX_REQUEST_ID or not rid.isprintable():
            raise DriftloopError(f"--request-id {rid!r} is not a request id (1 to {MAX_REQUEST_ID} printable characters)")
    for h in hashes:
        if not HEX64.fullmatch(h):
            raise DriftloopError(f"--text-sha256 {h!r} is not a sha256 (64 hexadecimal characters)")
    return Selection(tuple(ids), tuple(hashes))


# --------------------------------------------------------------------------- the result


@dataclass
class DatasetMatch:
    sha256: str
    rows_matched: int
    needed_by: list[str] = field(default_factory=list)  # "tag (lineage key)" of served models that pin it
    deleted: bool = False
    named_by_unserved: list[str] = field(default_factory=list)  # never-served models whose lineage named it


@dataclass
class ForgetResult:
    request_ids: list[str]
    text_hashes: list[str]  # every hash looked for in the datasets and profiles
    rows_deleted: int = 0
    rows_by_request_id: dict[str, str] = field(default_factory=dict)  # request id -> text hash of its row
    datasets: list[DatasetMatch] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)  # {"model", "file", "rows"} holding the texts
    remaining: list[str] = field(default_factory=list)  # other copies that may be left (WAL, unreadable files)
    not_done: list[str] = field(default_factory=list)  # what could not be deleted and why, one line each
    notes: list[str] = field(default_factory=list)  # what was done that a reader should know, one line each

    @property
    def complete(self) -> bool:
        """No copy that driftloop knows of is left."""
        return not self.profiles and not self.remaining and all(d.deleted for d in self.datasets)

    def to_json(self) -> dict:
        return {**asdict(self), "complete": self.complete}


# --------------------------------------------------------------------------- the log


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _scan_hashes(engine: Engine, hashes: tuple[str, ...]) -> tuple[list[int], int]:
    """(ids of rows with one of `hashes`, the newest id when the scan began): a full read of the
    log (no index on the hash), done outside the delete's transaction so the service keeps writing."""
    if not hashes:
        return [], 0
    high = predlog.max_id(engine)
    c = predictions.c
    ids: list[int] = []
    with engine.connect() as conn:
        for part in _chunks(list(hashes)):
            ids += [i for (i,) in conn.execute(select(c.id).where(c.id <= high, c.text_sha256.in_(part)))]
    return sorted(set(ids)), high


def _delete_returning(conn: Connection, where) -> list[tuple[str, str]]:
    """Delete the rows `where` selects and their raw content (text, embedding: core/predlog.py)."""
    c = predictions.c
    gone = conn.execute(delete(predictions).where(where).returning(c.id, c.request_id, c.text_sha256)).all()
    for part in _chunks([i for i, _, _ in gone]):
        conn.execute(delete(predlog.raw).where(predlog.raw.c.id.in_(part)))
    return [(r, h) for _, r, h in gone]


def delete_rows(engine: Engine, selection: Selection) -> list[tuple[str, str]]:
    """Delete the selected rows in one transaction; returns (request id, text hash) of each."""
    predlog.ensure_schema(engine)
    scanned, high = _scan_hashes(engine, selection.text_hashes)
    c = predictions.c
    sqlite = engine.dialect.name == "sqlite"
    deleted: list[tuple[str, str]] = []
    with engine.connect() as conn:
        if sqlite:  # zero the freed content rather than leave it readable in free pages; a per-connection switch
            conn.exec_driver_sql("PRAGMA secure_delete=ON")
            conn.commit()  # ends the autobegun transaction, so that the deletes get one of their own
        try:
            with conn.begin():
                for part in _chunks(list(selection.request_ids)):
                    deleted += _delete_returning(conn, c.request_id.in_(part))
                for part in _chunks(scanned):
                    deleted += _delete_returning(conn, c.id.in_(part))
                for part in _chunks(list(selection.text_hashes)):  # logged since the scan
                    deleted += _delete_returning(conn, (c.id > high) & c.text_sha256.in_(part))
        finally:
            if sqlite:  # the pooled connection goes back as it came
                conn.exec_driver_sql("PRAGMA secure_delete=OFF")
                conn.commit()
    return deleted


def _scrub_wal(engine: Engine) -> str | None:
    """SQLite: truncate the WAL, which still holds the deleted rows' old pages; a line if it could not."""
    if engine.dialect.name != "sqlite":
        return None
    with engine.connect() as conn:
        busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    if busy:
        return ("the SQLite WAL could not be truncated now (a reader holds an old snapshot): the deleted rows' old "
                "pages stay in state.db-wal until the next checkpoint")
    return None


# --------------------------------------------------------------------------- datasets


def dataset_files() -> list[Path]:
    """The stored datasets (not the temporary files of a write in progress)."""
    return sorted(p for p in data_store.store_dir().glob("*.jsonl") if HEX64.fullmatch(p.stem))


def matching_lines(path: Path, hashes: set[str]) -> int:
    """How many of the dataset's lines hold a text whose sha256 is in `hashes`."""
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip() and predlog.text_hash(json.loads(line)["text"]) in hashes:
                n += 1
    return n


def _hashes_in(value, at: str = "") -> Iterator[tuple[str, str]]:
    """(64-hex string, where in the lineage) for every dataset name a lineage may hold: a DatasetRef's
    sha256, a config's data path into the store, any key added later."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _hashes_in(v, f"{at}.{k}" if at else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _hashes_in(v, f"{at}[{i}]")
    elif isinstance(value, str):
        for h in HEX64_ANYWHERE.findall(value.lower()):
            yield h, at


def _own_ref(model: registry.RegisteredModel) -> str | None:
    ref = data_store.DatasetRef.from_json((model.lineage.get("data_lineage") or {}).get("own"))
    return ref.sha256 if ref else None


def _ancestors(model: registry.RegisteredModel) -> Iterator[registry.RegisteredModel]:
    """Its parent, grandparent, ... while they are in the store (as loop/refine.py `ancestry` walks them)."""
    seen = {model.tag}
    parent = model.lineage.get("parent")
    while parent and parent not in seen:
        try:
            model = registry.get(parent)
        except DriftloopError:
            return
        seen.add(model.tag)
        yield model
        parent = model.lineage.get("parent")


def served_tags(engine: Engine) -> list[str]:
    """Every model the production alias ever pointed at (promoted or rolled back to)."""
    ensure_alias_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(select(alias_history.c.tag, func.max(alias_history.c.id))
                            .where(alias_history.c.alias == PRODUCTION).group_by(alias_history.c.tag)).all()
    return [tag for tag, _ in sorted(rows, key=lambda r: -r[1])]


def dataset_needs(engine: Engine) -> dict[str, list[str]]:
    """Dataset sha256 -> "tag (why)" of each served model still in the store that needs it."""
    needs: dict[str, list[str]] = {}
    for tag in served_tags(engine):
        try:
            model = registry.get(tag)
        except DriftloopError:  # deleted from the store: it needs nothing any more
            continue
        for sha, where in _hashes_in(model.lineage):
            needs.setdefault(sha, []).append(f"{model.tag} ({where})")
        for ancestor in _ancestors(model):
            sha = _own_ref(ancestor)
            if sha:
                needs.setdefault(sha, []).append(f"{model.tag} (replays {ancestor.tag}'s own rows)")
    return {sha: list(dict.fromkeys(why)) for sha, why in needs.items()}


def _search_datasets(hashes: set[str]) -> tuple[list[DatasetMatch], list[str]]:
    """(the dataset files holding one of `hashes`, a line for each file that could not be read)."""
    matches, unreadable = [], []
    for path in dataset_files():
        try:
            n = matching_lines(path, hashes)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            unreadable.append(f"dataset {path.stem[:12]} could not be searched ({type(err).__name__}: {err}): "
                              f"check {path} by hand")
            continue
        if n:
            matches.append(DatasetMatch(path.stem, n))
    return matches, unreadable


def forget_datasets(engine: Engine, matches: list[DatasetMatch], models: list[registry.RegisteredModel]) -> None:
    """Delete each matched dataset file that no served model needs; keep the rest. `models`: the
    whole store, to name the never-served models whose lineage loses a deleted file."""
    if not matches:
        return
    needs = dataset_needs(engine)
    for m in matches:
        m.needed_by = needs.get(m.sha256, [])
        if not m.needed_by:
            data_store.path_of(m.sha256).unlink(missing_ok=True)
            m.deleted = True
            m.named_by_unserved = [x.tag for x in models if any(sha == m.sha256 for sha, _ in _hashes_in(x.lineage))]


# --------------------------------------------------------------------------- reference profiles


def _profile_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - only when a model store is searched

    if "text" not in pq.read_schema(path).names:
        return []
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if isinstance(t, str)]


def profiles_holding(hashes: set[str], models: list[registry.RegisteredModel]) -> tuple[list[dict], list[str]]:
    """({"model", "file", "rows"} for every reference profile (any parquet file in a model's
    directory: the registered one and the per-runtime copies) holding one of `hashes`, a line for
    each file that could not be read)."""
    found, unreadable = [], []
    for model in models:
        for path in sorted(Path(model.path).rglob("*.parquet")):
            name = str(path.relative_to(model.path))
            try:
                n = sum(predlog.text_hash(t) in hashes for t in _profile_texts(path))
            except Exception as err:  # noqa: BLE001 - pyarrow's errors have no common base but Exception
                unreadable.append(f"model {model.tag}: {name} could not be searched ({type(err).__name__}): check it by hand")
                continue
            if n:
                found.append({"model": model.tag, "file": name, "rows": int(n)})
    return found, unreadable


# --------------------------------------------------------------------------- the whole request


def _refinement_notes(engine: Engine) -> list[str]:
    """A refinement running now may have read the rows before they went and write their texts into
    a new dataset or reference profile after this run: say so, so that the request is repeated."""
    return [f"a refinement holds rows of {h.model_version} ({h.reason}): it may have read these rows before they were "
            "deleted; forget again once it has finished" for h in retention.active_holds(engine)
            if h.reason.startswith("refinement")]


def _explain(result: ForgetResult, store_home: Path) -> None:
    """One line for each copy that stays, and for each selector that found nothing."""
    for rid in result.request_ids:
        if rid not in result.rows_by_request_id:
            result.not_done.append(f"request id {rid} matched no row in the prediction log (never logged, or already "
                                   "deleted by retention): its text's copies cannot be found by id; forget by --text-sha256")
    for d in result.datasets:
        if d.deleted:
            unserved = f"; never-served models that named it: {', '.join(d.named_by_unserved)}" if d.named_by_unserved else ""
            result.notes.append(f"dataset {d.sha256[:12]} ({d.rows_matched} matching row(s)) deleted{unserved}")
            continue
        tags = list(dict.fromkeys(n.split(" ", 1)[0] for n in d.needed_by))
        result.not_done.append(
            f"dataset {d.sha256[:12]} ({d.rows_matched} matching row(s)) kept: needed by served model(s) {'; '.join(d.needed_by)}; "
            f"delete them from the model store first (BENTOML_HOME={store_home} bentoml models delete {' '.join(tags)} -y; "
            "move production off a model that serves now), then forget again")
    result.not_done += result.remaining
    for p in result.profiles:
        result.not_done.append(f"model {p['model']} holds {p['rows']} of the texts in its reference profile ({p['file']}), "
                               "which cannot be edited (checksummed, immutable in the store): delete the model from the "
                               "store to erase them")


def forget(engine: Engine, selection: Selection) -> ForgetResult:
    """Delete the selected rows (one transaction), then the dataset files no served model needs;
    report what stays and why."""
    deleted = delete_rows(engine, selection)
    result = ForgetResult(list(selection.request_ids), [], rows_deleted=len(deleted))
    wanted = set(selection.request_ids)
    result.rows_by_request_id = {rid: h for rid, h in deleted if rid in wanted}
    logged = {h for _, h in deleted}
    hashes = set(selection.text_hashes) | logged
    result.text_hashes = sorted(hashes)
    wal = _scrub_wal(engine) if deleted else None
    if wal:
        result.remaining.append(wal)
    if engine.dialect.name == "postgresql" and deleted:
        result.notes.append("Postgres keeps deleted rows' bytes in the table files until (auto)vacuum reclaims them: "
                            "VACUUM predictions to hasten it")
    result.notes += [f"text hash {h[:12]} matched no row in the prediction log; its copies were looked for in the stores"
                     for h in selection.text_hashes if h not in logged]
    if hashes:
        models = registry.list_models()
        result.datasets, unreadable = _search_datasets(hashes)
        forget_datasets(engine, result.datasets, models)
        result.profiles, unreadable_profiles = profiles_holding(hashes, models)
        result.remaining += unreadable + unreadable_profiles
    result.notes += _refinement_notes(engine)
    _explain(result, bentoml_home())
    # the erasure itself is on record (art. 17 asks the controller to show it acted), with counts
    # only: no request id, hash or text of the person who asked
    audit.record(engine, "log_forget", None, rows_deleted=result.rows_deleted, selectors=len(selection.request_ids) + len(selection.text_hashes),
                 datasets_deleted=sum(1 for d in result.datasets if d.deleted), datasets_kept=sum(1 for d in result.datasets if not d.deleted),
                 profiles_holding=len(result.profiles), complete=result.complete)
    return result
