"""A small trainer: device pick, seeding, AMP on CUDA, per-epoch validation with early
stopping, a checkpoint per epoch (model, optimizer, RNG state) and resume."""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from training.config import TrainerConfig
from training.data import CSR, Context, device_batches_supported, device_epoch_batches, epoch_batches
from training.model import TwoTower
from training.task import RetrievalTask

log = logging.getLogger(__name__)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return np.random.default_rng(seed)


def lr_at(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """Learning rate of 1-based `epoch` of `epochs`: constant, or cosine from lr (epoch 1) towards 0
    (the last epoch gets lr * (1 - cos(pi / epochs)) / 2, never exactly 0). A pure function of the
    epoch, so resume needs no scheduler state."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of fit(), validation included
    # what a private fit guarantees (mode, epsilon, delta, accountant, ...): goes into MLflow and the
    # manifest so serving can show it on the model card; None for ordinary training
    privacy: dict[str, Any] | None = None
    # blend.ease: the (weight, lambda, validation NDCG) chosen with the train-fitted model; None: no blend
    blend: dict[str, float] | None = None
    # search.enabled: the successive-halving rungs and the chosen settings (training/search.py); None: no search
    search: dict[str, Any] | None = None


@dataclass
class EarlyStopping:
    """Which validated epoch to keep, and when to stop (shared by Trainer and the distributed trainer).

    Every epoch whose validation value beats `best` becomes the kept one. Patience is reset only by
    a *significant* gain: a value above `anchor` · (1 + `min_delta`), `anchor` being the value at the
    last reset; so a metric creeping up by tiny steps stops after `patience` epochs instead of running
    to the epoch cap. The fit also stops after the epoch that crosses `max_seconds` of wall time.
    """

    patience: int
    min_delta: float = 0.0
    max_seconds: float | None = None
    best: float = -1.0
    best_epoch: int = 0
    anchor: float = float("-inf")
    bad: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's validation value; True when it is the new best (keep its weights)."""
        if value > self.anchor * (1.0 + self.min_delta) if self.anchor > 0 else value > self.anchor:
            self.anchor, self.bad = value, 0
        else:
            self.bad += 1
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def stop_reason(self, elapsed_s: float) -> str | None:
        """Why the fit stops now (a log line's tail), or None to go on."""
        if self.bad >= self.patience:
            return f"no gain above {self.min_delta:.1%} for {self.bad} epochs"
        if self.max_seconds is not None and elapsed_s >= self.max_seconds:
            return f"time budget of {self.max_seconds:.0f} s spent ({elapsed_s:.0f} s)"
        return None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (`best_metric`, `best_epoch`, `bad_epochs` as before, and the anchor)."""
        return {"best_metric": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad, "anchor": self.anchor}


def resume_point(trainer: Any, resume: bool, rng: np.random.Generator, stopping: EarlyStopping) -> tuple[int, dict | None, list]:
    """(first epoch, best state, history) a fit starts from, `stopping` filled in: the latest
    checkpoint's when resuming (`trainer.latest_checkpoint()` / `trainer._restore`, which also
    restores the RNGs), else a fresh start. Shared by Trainer and the distributed trainer. A
    checkpoint from before `anchor` was kept resumes with the anchor at its best value."""
    if resume and (path := trainer.latest_checkpoint()) is not None:
        p = trainer._restore(path, rng)
        stopping.best, stopping.best_epoch, stopping.bad = p["best_metric"], p["best_epoch"], p["bad_epochs"]
        stopping.anchor = p.get("anchor", p["best_metric"])
        return p["epoch"] + 1, p["best_state"], p["history"]
    if resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", trainer.ckpt_dir)
    return 1, None, []


class Trainer:
    def __init__(
        self,
        model: TwoTower,
        task: RetrievalTask,
        cfg: TrainerConfig,
        history_dropout: float,
        user_id_dropout: float,
        device: torch.device,
        demographics_dropout: float = 0.0,
        stated_dropout: float = 0.5,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.model, self.task, self.cfg, self.device = model, task, cfg, device
        self.history_dropout, self.user_id_dropout = history_dropout, user_id_dropout
        self.demographics_dropout, self.stated_dropout = demographics_dropout, stated_dropout
        self.on_epoch = on_epoch or (lambda epoch, metrics: None)
        # fused on CUDA (PyTorch's advice: one kernel per step, not several per parameter); on the
        # H200 at 10k users x 3k items no change showed through the noise (0.28-0.39 vs 0.33-0.40 s/epoch)
        fused = True if device.type == "cuda" else None
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        self.amp = cfg.amp and device.type == "cuda"
        self.monitor = f"val/ndcg@{task.k}"
        if cfg.device_batches and not device_batches_supported(model.spec):
            raise ValueError("trainer.device_batches: true, but stated-genre features are built on the host only; use null (auto) or false")
        auto = cfg.device_batches is None and device.type == "cuda" and device_batches_supported(model.spec)
        self.device_batches = bool(cfg.device_batches) or auto

    def _batches(self, train: CSR, ctx: Context, rng: np.random.Generator):
        """One epoch's batches: built on the device (trainer.device_batches) or with numpy on the host."""
        if self.device_batches:
            return device_epoch_batches(self.model.spec, ctx, train, self.cfg.batch_size, self.history_dropout, self.user_id_dropout, rng, self.device, self.demographics_dropout)
        return epoch_batches(
            self.model.spec, ctx, train, self.cfg.batch_size, self.history_dropout, self.user_id_dropout, rng, self.device,
            self.demographics_dropout, self.stated_dropout,
        )

    def _compile(self, on: bool) -> None:
        """trainer.compile: torch.compile the towers' MLPs in place (nn.Module.compile: the state_dict
        keys stay as they are) for the fit, and back to eager after it (export traces the eager model)."""
        if not self.cfg.compile:
            return
        for arch in (self.model.user_arch, self.model.item_arch):
            if on:  # dynamic: batch sizes vary (the last batch, validation)
                arch.mlp.compile(dynamic=True, mode=None if self.cfg.compile_mode == "default" else self.cfg.compile_mode)
            else:
                arch.mlp._compiled_call_impl = None

    # -- checkpoints ---------------------------------------------------------------------
    def _save(self, epoch: int, rng: np.random.Generator, state: dict) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "numpy_generator": rng.bit_generator.state,
                "numpy_global": np.random.get_state(),
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            **state,
        }
        tmp = self.ckpt_dir / f".epoch-{epoch:03d}.pt.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.ckpt_dir / f"epoch-{epoch:03d}.pt")  # atomic: never a half-written checkpoint

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.ckpt_dir.glob("epoch-*.pt"))
        return found[-1] if found else None

    def _restore(self, path: Path, rng: np.random.Generator) -> dict:
        payload = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(payload["model"])
        if payload["optimizer"] is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
        else:  # a distributed run's checkpoint: its fused optimizers lived in the sharded tables
            log.warning("checkpoint %s has no optimizer state (written by a distributed run): Adam restarts from zero moments", path.name)
        rng.bit_generator.state = payload["rng"]["numpy_generator"]
        np.random.set_state(payload["rng"]["numpy_global"])
        random.setstate(payload["rng"]["python"])
        torch.set_rng_state(payload["rng"]["torch"])
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        log.info("resumed from %s (epoch %d)", path, payload["epoch"])
        return payload

    # -- loop ------------------------------------------------------------------------------
    def fit(self, train: CSR, val_history: CSR | None, val_truth: CSR | None, ctx: Context, resume: bool = False, epochs: int | None = None) -> FitResult:
        """Train; with validation data, keep the best-validation epoch's weights (early stopping).

        Without it (`val_truth=None`: the refit on train + val, whose epoch count validation
        already chose), run exactly `epochs` epochs (default `cfg.epochs`) and keep the last.
        """
        self._compile(True)
        try:
            return self._fit(train, val_history, val_truth, ctx, resume, epochs)
        finally:
            self._compile(False)

    def _fit(self, train: CSR, val_history: CSR | None, val_truth: CSR | None, ctx: Context, resume: bool, epochs: int | None) -> FitResult:
        started = time.perf_counter()
        validate = val_truth is not None
        epochs = self.cfg.epochs if epochs is None else epochs
        rng = seed_everything(self.cfg.seed)
        stopping = EarlyStopping(self.cfg.patience, self.cfg.min_delta, self.cfg.max_seconds)
        start, best_state, history = resume_point(self, resume, rng, stopping)

        epoch = start - 1
        for epoch in range(start, epochs + 1):
            if validate and stopping.bad >= stopping.patience:
                epoch = start - 1  # resumed from a run that had already stopped early: nothing ran now
                break
            self.model.train()
            for group in self.optimizer.param_groups:
                # the schedule always spans cfg.epochs: a refit stopping at the chosen epoch replays the
                # selection run's learning rates exactly
                group["lr"] = lr_at(self.cfg.lr, self.cfg.lr_schedule, epoch, self.cfg.epochs)
            n_batches = -(-int((np.diff(train[0]) > 0).sum()) // self.cfg.batch_size)
            batches = self._batches(train, ctx, rng)
            if self.cfg.steps_per_epoch is not None:
                n_batches = min(n_batches, self.cfg.steps_per_epoch)
                batches = itertools.islice(batches, n_batches)
            total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
            bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}/{epochs}", disable=not self.cfg.progress, leave=False)
            graphs = self.cfg.compile and self.cfg.compile_mode == "reduce-overhead" and self.device.type == "cuda"
            for batch in bar:
                if graphs:  # a new step: the CUDA graphs' outputs of the last one may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = self.task.loss(self.model, batch, ctx)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total, count = total + loss.detach(), count + 1  # summed on the device: no host sync per step
                if self.cfg.progress and count % 20 == 0:
                    bar.set_postfix(loss=f"{total.item() / count:.4f}")
            metrics = {"train/loss": total.item() / max(count, 1)}
            if validate:
                metrics.update({f"val/{k}": v for k, v in self.task.metrics(self.model, val_history, val_truth, ctx, self.device).items()})
            history.append({"epoch": epoch, **metrics})
            if not validate:  # refit: the last epoch is the model
                stopping.best, stopping.best_epoch, best_state = float("nan"), epoch, None
            elif stopping.update(metrics[self.monitor], epoch):
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            log.info("epoch %d %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.on_epoch(epoch, metrics)
            self._save(epoch, rng, {**stopping.state(), "best_state": best_state, "history": history, "spec": asdict(self.model.spec)})
            if validate and (reason := stopping.stop_reason(time.perf_counter() - started)):
                log.info("early stop at epoch %d (best %d): %s: %s", epoch, stopping.best_epoch, self.monitor, reason)
                break

        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(stopping.best_epoch, stopping.best, epoch, history, time.perf_counter() - started)
