"""Serving runtimes for a registered model: PyTorch, ONNX Runtime fp32, ONNX Runtime int8.

A registered model is trained and stored as PyTorch weights. For serving it can also run through
ONNX Runtime's fused CPU kernels (`onnx`) or with its linear layers dynamically quantised to int8
(`onnx-int8`). Both files are made from the model once, on first serve, with the maintained tools:
`torch.onnx.export` (the dynamo exporter: the TorchScript one traced transformers 5's attention-mask
code wrongly, 0.15 logit error measured against 4e-7 for dynamo) and `onnxruntime.quantization
.quantize_dynamic`. They live in the model's own directory (`runtimes/`), written under a file lock
(N workers export once) and by rename (a crash leaves no half file), with a manifest recording each
file's sha256, the exporter's versions and the int8 accuracy check. A file whose checksum no longer
matches, or that does not load, is refused with one line: the service keeps its old model.

The exported graph returns what the monitor needs, the logits and the mean-pooled embedding, so the
prediction log, descriptors and drift tests work unchanged (`RuntimePredictor` is a `Predictor`).

A model the exporter cannot handle (an unusual architecture) serves on PyTorch instead, and says so
in `runtime_note`; a file that was made but no longer matches its checksum or does not load is
refused (corruption is not a reason to serve something else).

**The int8 accuracy gate.** Before an int8 variant serves, its accuracy on the model's held-out
labelled rows (its regression suite, else its validation rows in the reference profile) must be
within `int8_tolerance_pt` points of the fp32 graph's on the same rows; otherwise fp32 ONNX serves
and `runtime_note` says why (the service shows it on /model, in its log and as a metric).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from core import data_store, profile, registry
from core.data_store import DatasetRef
from core.errors import DriftloopError
from core.inference import Predictions, Predictor, load_predictor
from core.modeling import load_tokenizer, pick_device

log = logging.getLogger("driftloop.runtimes")

Runtime = Literal["torch", "onnx", "onnx-int8"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
RUNTIME_DIR = "runtimes"
MANIFEST = "manifest.json"
FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
OPSET = 18

# What the service serves unless told otherwise (service/settings.py); the loop reads the same
# variables so that its gate and bake score the runtime that serves (`serving_choice`).
DEFAULT_RUNTIME: Runtime = "onnx"
DEFAULT_INT8_TOLERANCE_PT = 0.5
RUNTIME_ENV, TOLERANCE_ENV = "DRIFTLOOP_SERVICE_RUNTIME", "DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT"


@dataclass(frozen=True)
class ServingChoice:
    """The runtime the service is asked to serve and its int8 tolerance: the loop scores models as
    they will serve (an int8 variant that fails its accuracy check serves, and is scored, as fp32)."""

    runtime: Runtime = DEFAULT_RUNTIME
    int8_tolerance_pt: float = DEFAULT_INT8_TOLERANCE_PT

    def load(self, tag: str, device: str = "cpu") -> Predictor:
        return load_runtime_predictor(tag, self.runtime, device=device, precision="fp32",
                                      int8_tolerance_pt=self.int8_tolerance_pt)


def serving_choice(runtime: str | None = None, int8_tolerance_pt: float | None = None, *,
                   observed: str | None = None) -> ServingChoice:
    """The runtime and tolerance to score a model on: the given ones; else this process's
    DRIFTLOOP_SERVICE_RUNTIME / DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT (what `driftloop up` passes to
    the service and the controller alike); else `observed`, the runtime the prediction log says
    served the model (predlog.recent_runtime: right when the service runs elsewhere with its own
    settings); else the defaults."""
    runtime = runtime or os.environ.get(RUNTIME_ENV) or observed or DEFAULT_RUNTIME
    if runtime not in RUNTIMES:
        raise DriftloopError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if int8_tolerance_pt is None:
        raw = os.environ.get(TOLERANCE_ENV)
        try:
            int8_tolerance_pt = DEFAULT_INT8_TOLERANCE_PT if raw is None else float(raw)
        except ValueError:
            raise DriftloopError(f"invalid {TOLERANCE_ENV}: {raw!r} is not a number") from None
    return ServingChoice(runtime, int8_tolerance_pt)  # type: ignore[arg-type]


class LogitsAndPooled(nn.Module):
    """The graph that is exported: the classifier's logits and its attention-masked mean pooling of
    the last hidden state, exactly what `Predictor.forward` computes from the PyTorch model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return out.logits, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(directory: Path):
    """An exclusive lock on `directory` across processes (the service's workers start together)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace_atomically(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def export_onnx(predictor: Predictor, target: Path) -> None:
    """Export a PyTorch predictor's model (fp32, CPU) to `target`, batch and sequence dynamic."""
    model = predictor.model.to("cpu").float().eval()
    sample = predictor.tokenizer(["a short sample", "a somewhat longer sample sentence for the export"],
                                 padding=True, return_tensors="pt")
    tmp = target.with_suffix(".tmp")
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=4096)
    dynamic = {0: batch, 1: sequence}  # one batch and one sequence length shared by both inputs
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(LogitsAndPooled(model).eval(), (sample["input_ids"], sample["attention_mask"]), str(tmp),
                          input_names=["input_ids", "attention_mask"], output_names=["logits", "pooled"],
                          dynamic_shapes={"input_ids": dynamic, "attention_mask": dynamic},
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    _replace_atomically(tmp, target)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the fp32 graph's weights (activations quantised at run time).

    Per-channel weight scales and 7-bit ranges (`reduce_range`, which avoids the u8·s8 overflow of
    AVX2/AVX-512 kernels without VNNI): measured on an SST-2 MiniLM model (docs/benchmarks.md), SST-2
    test accuracy lost 1.03 pt with the defaults, 0.35 with per-channel alone, 0.12 with both, at the
    same speed (589 vs 600 texts/s)."""
    tmp = target.with_suffix(".tmp")
    quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    _replace_atomically(tmp, target)


def held_out_rows(model: registry.RegisteredModel) -> list[tuple[str, str]]:
    """Labelled rows the model never trained on: its regression suite (every domain it was promoted
    for), else the labelled validation rows of its reference profile."""
    ref = DatasetRef.from_json((model.lineage.get("data_lineage") or {}).get("regression_suite"))
    if ref is not None:
        rows = data_store.get(ref)
    else:
        frame, _ = profile.load(model.path)
        rows = [(t, y) for t, y in zip(frame["text"].tolist(), frame["label"].tolist()) if isinstance(y, str)]
    names = set(model.lineage["label_names"])
    return [(t, y) for t, y in rows if y in names]


def accuracy(predictor: Predictor, rows: list[tuple[str, str]], batch_size: int = 32) -> float:
    out = predictor.predict([t for t, _ in rows], batch_size=batch_size)
    return float(np.mean([predictor.label_names[i] == y for i, y in zip(out.labels, [y for _, y in rows])]))


class RuntimePredictor(Predictor):
    """A `Predictor` whose forward pass runs an exported graph in ONNX Runtime: same tokenisation,
    descriptors, truncation, temperature and outputs as the PyTorch one."""

    def __init__(self, path: Path, tokenizer, label_names: list[str], *, runtime: str, temperature: float = 1.0,
                 max_length: int = 128, device: torch.device | None = None, threads: int = 0):
        device = device or torch.device("cpu")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - whatever ONNX Runtime raises, the answer is "does not load"
            raise DriftloopError(f"{path.name} does not load in ONNX Runtime: {(str(err).splitlines() or [''])[0][:300]}") from None
        self.device = torch.device("cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")
        self.model = None
        self.amp_dtype = None
        self._init_text(tokenizer, label_names, temperature, max_length)
        self.runtime = runtime
        self.runtime_note: str | None = None

    def forward(self, texts: list[str]) -> Predictions:
        batch, descriptors, truncated = self._encode(texts)
        feeds = {"input_ids": batch["input_ids"].numpy().astype(np.int64),
                 "attention_mask": batch["attention_mask"].numpy().astype(np.int64)}
        logits, pooled = self.session.run(["logits", "pooled"], feeds)
        logits = logits.astype(np.float32)
        scaled = logits / self.temperature
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return Predictions(logits=logits, probs=probs.astype(np.float32), embeddings=pooled.astype(np.float32),
                           descriptors=descriptors, truncated=truncated)


def _manifest_path(model: registry.RegisteredModel) -> Path:
    return Path(model.path) / RUNTIME_DIR / MANIFEST


def read_manifest(model: registry.RegisteredModel) -> dict:
    path = _manifest_path(model)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_manifest(model: registry.RegisteredModel, manifest: dict) -> None:
    path = _manifest_path(model)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    _replace_atomically(tmp, path)


def _verified(model: registry.RegisteredModel, runtime: str, manifest: dict) -> Path:
    """The runtime's file, if present and matching its recorded checksum; else DriftloopError."""
    entry = (manifest.get("files") or {}).get(runtime)
    path = Path(model.path) / RUNTIME_DIR / FILES[runtime]
    if entry is None or not path.is_file():
        raise DriftloopError(f"{model.tag} has no {runtime} file yet")
    if sha256_of(path) != entry["sha256"]:
        raise DriftloopError(f"{model.tag}: {path.name} does not match its recorded sha256 (corrupt or changed): refused")
    return path


def ensure_files(model: registry.RegisteredModel, runtime: str, torch_predictor: Predictor | None = None) -> dict:
    """Make the runtime's ONNX file(s) for `model` unless they exist; returns the manifest. Under an
    exclusive lock, so of N workers starting together one exports and the others read its files."""
    if runtime == "torch":
        return read_manifest(model)
    needed = ["onnx"] if runtime == "onnx" else ["onnx", "onnx-int8"]
    with _exclusive(Path(model.path) / RUNTIME_DIR):
        manifest = read_manifest(model)
        files = dict(manifest.get("files") or {})
        for name in needed:
            if name in files:
                continue  # made before: checked against its checksum when loaded
            started = time.perf_counter()
            target = Path(model.path) / RUNTIME_DIR / FILES[name]
            if name == "onnx":
                export_onnx(torch_predictor or load_predictor(model.tag, device="cpu", precision="fp32"), target)
            else:
                quantize_int8(Path(model.path) / RUNTIME_DIR / FILES["onnx"], target)
            files[name] = {"file": FILES[name], "sha256": sha256_of(target), "bytes": target.stat().st_size,
                           "seconds": round(time.perf_counter() - started, 2),
                           "made_at": dt.datetime.now(dt.timezone.utc).isoformat()}
            log.info("%s: made %s (%.1f MB) in %.1fs", model.tag, FILES[name], files[name]["bytes"] / 1e6, files[name]["seconds"])
        if files != manifest.get("files"):
            manifest = {**manifest, "files": files, "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
                        "opset": OPSET}
            _write_manifest(model, manifest)
    return manifest


def _int8_check(model: registry.RegisteredModel, fp32: Callable[[], RuntimePredictor], int8: RuntimePredictor) -> dict:
    """Accuracy of the fp32 and int8 graphs on the model's held-out rows: measured once, under the
    lock (N workers score once), and kept in the manifest (a registered model's files and rows never change)."""
    with _exclusive(Path(model.path) / RUNTIME_DIR):
        manifest = read_manifest(model)
        check = manifest.get("int8_check")
        if check and check.get("int8_sha256") == manifest["files"]["onnx-int8"]["sha256"]:
            return check
        rows = held_out_rows(model)
        if not rows:
            raise DriftloopError(f"{model.tag} has no held-out labelled rows to check its int8 variant on")
        check = {"n": len(rows), "accuracy_fp32": accuracy(fp32(), rows), "accuracy_int8": accuracy(int8, rows),
                 "int8_sha256": manifest["files"]["onnx-int8"]["sha256"]}
        _write_manifest(model, {**manifest, "int8_check": check})
    return check


def load_runtime_predictor(tag: str, runtime: Runtime = "torch", *, device: str = "auto", precision: str = "auto",
                           int8_tolerance_pt: float = 0.5, threads: int = 0) -> Predictor:
    """A registered model ready to serve on `runtime`. The predictor says what serves and why in
    `.runtime` and `.runtime_note` (an int8 variant that loses more than `int8_tolerance_pt`
    accuracy points against fp32 on the held-out rows serves as fp32 ONNX instead)."""
    if runtime not in RUNTIMES:
        raise DriftloopError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return load_predictor(tag, device=device, precision=precision)
    model = registry.get(tag)
    try:
        manifest = ensure_files(model, runtime)
    except Exception as err:  # noqa: BLE001 - an architecture the exporter cannot handle still serves, on torch
        predictor = load_predictor(tag, device=device, precision=precision)
        predictor.runtime = "torch"
        predictor.runtime_note = (f"{runtime} export failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); "
                                  "serving torch")
        log.warning("%s: %s", tag, predictor.runtime_note)
        return predictor
    tokenizer = load_tokenizer(str(model.path))
    lin = model.lineage
    common = {"temperature": lin.get("temperature", 1.0), "max_length": lin.get("max_length", 128),
              "device": pick_device(device), "threads": threads}
    fp32_path = _verified(model, "onnx", manifest)  # checked even when int8 serves: it is the fallback

    def fp32() -> RuntimePredictor:  # a session only where one is used: int8 alone serves once its check is kept
        return RuntimePredictor(fp32_path, tokenizer, lin["label_names"], runtime="onnx", **common)

    if runtime == "onnx":
        return fp32()
    int8 = RuntimePredictor(_verified(model, "onnx-int8", manifest), tokenizer, lin["label_names"],
                            runtime="onnx-int8", **common)
    check = _int8_check(model, fp32, int8)
    loss_pt = round((check["accuracy_fp32"] - check["accuracy_int8"]) * 100, 3)
    if loss_pt > int8_tolerance_pt:
        fallback = fp32()
        fallback.runtime_note = (f"onnx-int8 refused: {check['accuracy_int8']:.4f} vs fp32 {check['accuracy_fp32']:.4f} on "
                             f"{check['n']} held-out rows, {loss_pt:.2f} pt lost > {int8_tolerance_pt} allowed; serving onnx (fp32)")
        log.warning("%s: %s", tag, fallback.runtime_note)
        return fallback
    int8.runtime_note = (f"onnx-int8 accepted: {check['accuracy_int8']:.4f} vs fp32 {check['accuracy_fp32']:.4f} on "
                         f"{check['n']} held-out rows ({loss_pt:+.2f} pt lost, {int8_tolerance_pt} allowed)")
    return int8


# int8's dynamic quantisation scales activations per batch tensor, so its outputs depend a little on
# what shares the batch: the reference is computed in forward passes of the size the service uses on
# CPU (service/settings.py forward_batch_for: 8), sorted by length as it sorts them.
REFERENCE_FORWARD_BATCH = 8
REFERENCE_FILES = {"onnx": ("reference-onnx.parquet", "reference-onnx.npy"),
                   "onnx-int8": ("reference-onnx-int8.parquet", "reference-onnx-int8.npy")}


def _runtime_accuracy(model: registry.RegisteredModel, runtime: str, manifest: dict) -> tuple[float | None, int]:
    """The reference accuracy of `runtime`: the lineage's (PyTorch, on labelled rows of the traffic its
    profile comes from), except for int8, which may lose up to its tolerance: its check measured
    int8 against fp32 on the held-out rows, and that paired difference is applied to the lineage's
    figure (the check's own accuracy is of another population: the regression suite)."""
    ref = model.lineage.get("reference") or {}
    accuracy_, n = (None if ref.get("accuracy") is None else float(ref["accuracy"])), int(ref.get("n") or 0)
    check = manifest.get("int8_check") or {}
    if runtime == "onnx-int8" and check.get("int8_sha256") == (manifest.get("files") or {}).get("onnx-int8", {}).get("sha256"):
        if accuracy_ is None or ref.get("source") in (None, "validation split", "regression suite"):
            return float(check["accuracy_int8"]), int(check["n"])  # the check ran on that same population
        return min(1.0, max(0.0, accuracy_ + float(check["accuracy_int8"]) - float(check["accuracy_fp32"]))), n
    return accuracy_, n


def reference_profile(model: registry.RegisteredModel, runtime: str) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """The model's reference profile as `runtime` computes it: (frame, embeddings, info).

    The registered profile (core/profile.py) was computed with PyTorch at registration. int8's
    calibrated probabilities and embeddings differ from fp32's (ONNX fp32's do not, beyond 1e-4), so
    a monitor comparing int8 traffic with a PyTorch reference would report the runtime as drift
    (bench/runtime_drift.py measures it). The same texts are therefore run through the runtime's
    own graph, once, under the model's lock, and kept beside its files with their checksums; the
    labels are the registered profile's. `info`: runtime, rows, accuracy and its n.
    """
    frame, embeddings = profile.load(model.path)
    if runtime == "torch":
        acc, n = _runtime_accuracy(model, runtime, {})
        return frame, embeddings, {"runtime": "torch", "rows": len(frame), "accuracy": acc, "accuracy_n": n}
    directory = Path(model.path) / RUNTIME_DIR
    parquet, npy = (directory / name for name in REFERENCE_FILES[runtime])
    manifest = ensure_files(model, runtime)
    with _exclusive(directory):
        manifest = read_manifest(model)
        source = _verified(model, runtime, manifest)
        entry = (manifest.get("references") or {}).get(runtime)
        fresh = (entry is not None and entry["source_sha256"] == manifest["files"][runtime]["sha256"]
                 and parquet.is_file() and npy.is_file())
        if fresh:  # read once, under the lock, and checked as read: no rebuild can slip between check and use
            raw_parquet, raw_npy = parquet.read_bytes(), npy.read_bytes()
            if (hashlib.sha256(raw_parquet).hexdigest(), hashlib.sha256(raw_npy).hexdigest()) != (entry["parquet_sha256"], entry["npy_sha256"]):
                raise DriftloopError(f"{model.tag}: its {runtime} reference profile does not match its recorded sha256: refused "
                                     f"(delete {parquet.name} and {npy.name} to have it made again)")
        else:
            started = time.perf_counter()
            names = list(model.lineage["label_names"])
            predictor = RuntimePredictor(source, load_tokenizer(str(model.path)), names, runtime=runtime,
                                         temperature=model.lineage.get("temperature", 1.0),
                                         max_length=model.lineage.get("max_length", 128))
            texts = frame["text"].tolist()
            labels = [names.index(y) if isinstance(y, str) and y in names else None for y in frame["label"].tolist()]
            preds = predictor.predict(texts, batch_size=REFERENCE_FORWARD_BATCH)
            own_frame, own_embeddings = profile.build(texts, labels, names, preds)
            tmp_parquet, tmp_npy = parquet.with_suffix(".tmp"), npy.with_name(npy.name + ".tmp.npy")
            own_frame.to_parquet(tmp_parquet, index=False)
            np.save(tmp_npy, own_embeddings)
            _replace_atomically(tmp_parquet, parquet)
            _replace_atomically(tmp_npy, npy)
            entry = {"source_sha256": manifest["files"][runtime]["sha256"], "rows": len(own_frame),
                     "parquet_sha256": sha256_of(parquet), "npy_sha256": sha256_of(npy),
                     "seconds": round(time.perf_counter() - started, 2)}
            manifest = {**manifest, "references": {**(manifest.get("references") or {}), runtime: entry}}
            _write_manifest(model, manifest)
            log.info("%s: reference profile on %s, %d rows in %.1fs", model.tag, runtime, len(own_frame), entry["seconds"])
            raw_parquet, raw_npy = parquet.read_bytes(), npy.read_bytes()
    own_frame, own_embeddings = pd.read_parquet(io.BytesIO(raw_parquet)), np.load(io.BytesIO(raw_npy))
    acc, n = _runtime_accuracy(model, runtime, manifest)
    return own_frame, own_embeddings, {"runtime": runtime, "rows": len(own_frame), "accuracy": acc, "accuracy_n": n}
