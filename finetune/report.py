"""The training report: one self-contained HTML file per run, stored with the model.

Figures are drawn with matplotlib and inlined as SVG, so the file opens offline in any browser.
"""

from __future__ import annotations

import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from finetune.evaluation import reliability_bins, softmax  # noqa: E402


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]


def learning_curves(log_history: list[dict]) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [h for h in log_history if "eval_loss" in h]
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if evals:
        ax1.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation loss")
        ax2.plot([h["step"] for h in evals], [h.get("eval_accuracy") for h in evals], "o-", label="val accuracy")
        ax2.plot([h["step"] for h in evals], [h.get("eval_f1_macro") for h in evals], "s--", label="val macro-F1")
    ax1.set_xlabel("step"), ax1.set_title("Loss"), ax1.legend()
    ax2.set_xlabel("step"), ax2.set_title("Validation metrics"), ax2.legend()
    return _svg(fig)


def confusion(matrix: list[list[int]], label_names: list[str], title: str) -> str:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(label_names), 1 + 0.8 * len(label_names)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    return _svg(fig)


def roc_pr(logits: np.ndarray, labels: np.ndarray, label_names: list[str], temperature: float) -> str:
    probs = softmax(logits, temperature)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    classes = [1] if len(label_names) == 2 else range(len(label_names))
    for c in classes:
        y = (labels == c).astype(int)
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        prec, rec, _ = precision_recall_curve(y, probs[:, c])
        ax1.plot(fpr, tpr, label=label_names[c])
        ax2.plot(rec, prec, label=label_names[c])
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set_xlabel("false positive rate"), ax1.set_ylabel("true positive rate"), ax1.set_title("ROC"), ax1.legend()
    ax2.set_xlabel("recall"), ax2.set_ylabel("precision"), ax2.set_title("Precision-recall"), ax2.legend()
    return _svg(fig)


def reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for t, name, style in ((1.0, "before (T=1)", "o--"), (temperature, f"after (T={temperature:.2f})", "s-")):
        bins = reliability_bins(softmax(logits, t), labels, n_bins)
        ax.plot(bins["confidence"], bins["accuracy"], style, label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.set_title("Reliability"), ax.legend()
    return _svg(fig)


def _metrics_table(metrics: dict[str, dict]) -> str:
    keys = ["n", "accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "ece_uncalibrated", "ece", "nll"]
    head = "".join(f"<th>{k}</th>" for k in ["split", *keys])
    rows = []
    for split, m in metrics.items():
        cells = "".join(f"<td>{m.get(k):.4f}</td>" if isinstance(m.get(k), float) else f"<td>{m.get(k, '')}</td>" for k in keys)
        rows.append(f"<tr><td>{split}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render(*, tag: str, lineage: dict, log_history: list[dict], eval_split: str, eval_logits: np.ndarray,
           eval_labels: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray) -> str:
    """The whole report as one HTML string."""
    names = lineage["label_names"]
    temp = lineage["temperature"]
    m = lineage["metrics"]
    sections = [
        ("Metrics", _metrics_table(m)),
        ("Learning curves", learning_curves(log_history)),
        (f"Confusion matrix ({eval_split})", confusion(m[eval_split]["confusion_matrix"], names, eval_split)),
        (f"ROC and precision-recall ({eval_split})", roc_pr(eval_logits, eval_labels, names, temp)),
        ("Reliability on validation, before and after temperature scaling",
         reliability(val_logits, val_labels, temp, lineage["config"]["calibration"]["ece_bins"])),
        ("Data", f"<pre>{html.escape(json.dumps({'fingerprint': lineage['data'], 'cleaning': lineage['cleaning']}, indent=2))}</pre>"),
        ("Resolved config", f"<pre>{html.escape(yaml.safe_dump(lineage['config'], sort_keys=False))}</pre>"),
        ("Lineage", f"<pre>{html.escape(json.dumps({k: lineage[k] for k in ('parent', 'base_model', 'device', 'versions', 'training') if k in lineage}, indent=2, default=str))}</pre>"),
    ]
    body = "\n".join(f"<h2>{html.escape(title)}</h2>\n{content}" for title, content in sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>driftloop training report — {html.escape(tag)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}svg{{max-width:100%;height:auto}}</style></head>
<body><h1>Training report: {html.escape(tag)}</h1>
<p>accuracy ({eval_split}) <b>{m[eval_split]['accuracy']:.4f}</b> · macro-F1 {m[eval_split]['f1_macro']:.4f}
· temperature {temp:.3f} · trained in {lineage['training']['train_seconds']:.1f}s on {html.escape(lineage['device'])}</p>
{body}
</body></html>"""
