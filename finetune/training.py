"""Fine-tuning with transformers' Trainer: the optimiser/schedule toolbox, class weights,
gradual unfreezing, early stopping that restores the best weights, dynamic padding with
length-grouped batches, and DDP under ``torchrun`` without code changes.

Only what Trainer lacks is added here: the step/exponential/one-cycle/cyclic schedules (torch's
own schedulers), a class-weighted loss, and gradual unfreezing (which needs every parameter in the
optimiser from the start).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from core.base_model import resolve_base_model
from core.errors import DriftloopError
from core.home import runs_dir
from core.modeling import load_classifier, load_tokenizer
from finetune.config import TrainConfig
from finetune.data import PreparedData, Split, augment, oversample
from finetune.layers import freeze, unfreeze_schedule

HF_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
HF_OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "rmsprop": "rmsprop", "adagrad": "adagrad"}


@dataclass
class FitResult:
    """A trained model still in memory plus what happened during training."""

    model: torch.nn.Module
    tokenizer: object
    label_names: list[str]
    log_history: list[dict]
    train_seconds: float
    train_rows: int
    train_samples_seen: int
    epochs_run: float
    device: str
    world_size: int
    is_main_process: bool
    class_weights: list[float] | None
    truncated_train_texts: int
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.train_samples_seen / self.train_seconds if self.train_seconds else 0.0


def _tokenize(tokenizer, split: Split, max_length: int) -> tuple[list[dict], int]:
    """Token ids per row, cut to max_length (keeping the final special token); counts the cut rows."""
    ids = tokenizer(split.texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    rows, cut = [], 0
    for seq, label in zip(ids, split.labels):
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + seq[-1:]
            cut += 1
        rows.append({"input_ids": seq, "attention_mask": [1] * len(seq), "labels": int(label)})
    return rows, cut


def auto_class_weights(labels: list[int], n_classes: int, threshold: float = 1.5) -> list[float] | None:
    """Inverse-frequency weights when the largest class outnumbers the smallest by > threshold×."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if counts.min() == 0 or counts.max() / counts.min() <= threshold:
        return None
    return (counts.sum() / (n_classes * counts)).tolist()


def _compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    preds = np.asarray(logits).argmax(axis=-1)
    return {"accuracy": float(accuracy_score(labels, preds)), "f1_macro": float(f1_score(labels, preds, average="macro"))}


class DriftloopTrainer(Trainer):
    """Trainer plus torch's extra schedules, a class-weighted loss and gradual unfreezing."""

    def __init__(self, *args, dl_config: TrainConfig, class_weights: list[float] | None, steps_per_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.dl_config = dl_config
        self.steps_per_epoch = steps_per_epoch
        self.class_weight_tensor = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        if self.class_weight_tensor is not None:
            self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean; Trainer scales for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weight_tensor is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weight = self.class_weight_tensor.to(outputs.logits.device)
        loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, weight=weight)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if not self.dl_config.model.gradual_unfreezing:
            return super().create_optimizer(model)
        # Frozen parameters must be in the optimiser already to train once unfrozen.
        target = self.model if model is None else model
        saved = {n: p.requires_grad for n, p in target.named_parameters()}
        for p in target.parameters():
            p.requires_grad = True
        try:
            return super().create_optimizer(model)
        finally:
            for n, p in target.named_parameters():
                p.requires_grad = saved[n]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        t = self.dl_config.training
        if t.scheduler in HF_SCHEDULERS or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        opt = optimizer or self.optimizer
        spe = max(1, self.steps_per_epoch)
        sched = torch.optim.lr_scheduler
        if t.scheduler == "step":
            self.lr_scheduler = sched.StepLR(opt, step_size=max(1, round(spe * t.step_size_epochs)), gamma=t.gamma)
        elif t.scheduler == "exponential":
            self.lr_scheduler = sched.ExponentialLR(opt, gamma=t.gamma ** (1.0 / spe))
        elif t.scheduler == "onecycle":
            self.lr_scheduler = sched.OneCycleLR(opt, max_lr=t.learning_rate, total_steps=max(2, num_training_steps),
                                                 pct_start=max(t.warmup_ratio, 0.05), cycle_momentum=t.optimizer == "sgd")
        elif t.scheduler == "cyclic":
            self.lr_scheduler = sched.CyclicLR(opt, base_lr=t.learning_rate / 10, max_lr=t.learning_rate,
                                               step_size_up=max(1, spe // 2), cycle_momentum=t.optimizer == "sgd")
        self._created_lr_scheduler = True
        return self.lr_scheduler


class EpochSummary(TrainerCallback):
    """One line per evaluation for people (stderr, so `--json` stdout stays machine-readable)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last_loss = None
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.quiet or not state.is_world_process_zero or not metrics:
            return
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "   -  "
        print(f"epoch {state.epoch:5.2f}  train_loss {loss}  val_loss {metrics.get('eval_loss', float('nan')):.4f}  "
              f"val_acc {metrics.get('eval_accuracy', float('nan')):.4f}  val_f1 {metrics.get('eval_f1_macro', float('nan')):.4f}  "
              f"{time.perf_counter() - self.started:6.1f}s", file=sys.stderr, flush=True)


class GradualUnfreezing(TrainerCallback):
    """ULMFiT's gradual unfreezing: one more encoder layer trains at each epoch (finetune/layers.py)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        k = unfreeze_schedule(model, int(round(state.epoch or 0)))
        if not self.quiet and state.is_world_process_zero:
            print(f"gradual unfreezing: top {k} encoder layer(s) trainable", file=sys.stderr, flush=True)


class QuietProgress(ProgressCallback):
    """Trainer's progress bar without its raw log dicts (EpochSummary prints a readable line)."""

    def on_log(self, args, state, control, logs=None, **kw):
        pass


def _callbacks(config: TrainConfig, quiet: bool) -> list[TrainerCallback]:
    cbs = [EpochSummary(quiet)] + ([] if quiet else [QuietProgress()])
    if config.training.early_stopping_patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=config.training.early_stopping_patience))
    if config.model.gradual_unfreezing:
        cbs.append(GradualUnfreezing(quiet))
    return cbs


def _precision_flags(precision: str) -> dict[str, bool]:
    if not torch.cuda.is_available() or precision == "fp32":
        return {}
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {precision: True}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fit(config: TrainConfig, data: PreparedData, *, init_from: str | None = None, quiet: bool = False,
        progress: bool = True) -> FitResult:
    """Train a classifier on `data.train`, validating on `data.val`; returns the best weights.

    `init_from` starts from a fine-tuned model directory (refinement) instead of the base model.
    """
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight loading/saving bars: noise next to the training bar
    t, m = config.training, config.model
    if m.gradual_unfreezing and world_size() > 1:
        raise DriftloopError("model.gradual_unfreezing is not supported under DDP (torchrun): use model.freeze_layers")
    set_seed(t.seed)
    source = init_from or resolve_base_model(m.base_model)
    tokenizer = load_tokenizer(source)
    model = load_classifier(source, data.label_names, m.dropout, m.pooling)
    freeze(model, m.freeze_embeddings, m.freeze_layers)
    if m.gradual_unfreezing:
        unfreeze_schedule(model, 0)

    train_split = data.train
    if t.oversample:
        train_split = oversample(train_split, t.seed)
    if t.augment == "eda":
        train_split = augment(train_split, t.augment_copies, t.seed)
    train_rows, truncated = _tokenize(tokenizer, train_split, m.max_length)
    val_rows, _ = _tokenize(tokenizer, data.val, m.max_length)
    weights = auto_class_weights(train_split.labels, len(data.label_names)) if t.class_weights == "auto" else None

    per_step = t.batch_size * t.gradient_accumulation_steps * world_size()
    steps_per_epoch = max(1, math.ceil(len(train_rows) / per_step))
    eval_steps = max(1, steps_per_epoch // t.evals_per_epoch)
    out_dir = Path(tempfile.mkdtemp(prefix="train-", dir=runs_dir()))
    use_cuda = torch.cuda.is_available()
    best_metric = t.metric_for_best_model
    args = TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        optim=HF_OPTIMIZERS[t.optimizer],
        optim_args=f"momentum={t.momentum}" if t.optimizer in ("sgd", "rmsprop") else None,
        lr_scheduler_type=HF_SCHEDULERS.get(t.scheduler, "linear"),
        warmup_steps=t.warmup_ratio if t.scheduler in HF_SCHEDULERS else 0,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="loss" if best_metric == "loss" else best_metric,
        greater_is_better=best_metric != "loss",
        logging_steps=max(1, eval_steps // 5),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=quiet or not progress,
        dataloader_num_workers=t.dataloader_workers,
        use_cpu=not use_cuda,
        average_tokens_across_devices=False,  # else DDP logs (not gradients) scale with world size
        ddp_backend="gloo" if (world_size() > 1 and not use_cuda) else None,
        **_precision_flags(t.precision),
    )
    collator = DataCollatorWithPadding(
        tokenizer,
        padding=True if t.dynamic_padding else "max_length",
        max_length=None if t.dynamic_padding else m.max_length,
        pad_to_multiple_of=8 if (t.dynamic_padding and use_cuda) else None,
    )
    trainer = DriftloopTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows, data_collator=collator,
        processing_class=tokenizer, compute_metrics=_compute_metrics, callbacks=_callbacks(config, quiet),
        dl_config=config, class_weights=weights, steps_per_epoch=steps_per_epoch,
    )
    for cb in list(trainer.callback_handler.callbacks):
        # Trainer's own bar/printer dump raw log dicts; ours (QuietProgress, EpochSummary) print readable lines.
        if type(cb) in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(cb)
    started = time.perf_counter()
    try:
        output = trainer.train()
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(out_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    final = trainer.accelerator.unwrap_model(trainer.model)
    return FitResult(
        model=final, tokenizer=tokenizer, label_names=data.label_names, log_history=list(trainer.state.log_history),
        train_seconds=seconds, train_rows=len(train_rows), train_samples_seen=int(round(len(train_rows) * (trainer.state.epoch or 0))),
        epochs_run=float(trainer.state.epoch or 0), device=str(args.device), world_size=args.world_size,
        is_main_process=trainer.is_world_process_zero(), class_weights=weights, truncated_train_texts=truncated,
        source=source, extra={"train_loss": output.training_loss, "best_metric": trainer.state.best_metric,
                              "best_checkpoint_step": trainer.state.best_global_step if hasattr(trainer.state, "best_global_step") else None},
    )
