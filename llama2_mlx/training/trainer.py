"""A generic training loop: whatever parameters of the model are trainable
(LoRA matrices on a frozen base, a reward head, or everything).

The loss function returns ``(loss_sum, count)`` for a batch: the summed loss
and the number of items it sums over (target tokens, preference pairs). The
gradients of the micro-batches of a step are summed and divided by the step's
total count, so gradient accumulation equals one large batch exactly.

Steps are optimizer updates. The data is a function ``epoch -> sequence of
batches`` (same length for every epoch); micro-batch ``m`` of the run is batch
``m % len`` of epoch ``m // len``, so a checkpoint at step ``s`` resumes at
micro-batch ``s * grad_accum``. Dropout is seeded per micro-batch, so a
resumed run repeats the uninterrupted one.

Under ``mlx.launch`` the run is data-parallel (``data_parallel``): every step's global
batch is split across the processes, the gradient sums are added across them, and rank
0 alone writes checkpoints and artefacts and shows progress; the result equals the
one-process run, which a checkpoint may resume on any number of processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from llama2_mlx.errors import SEED_RANGE, Llama2Error, OptionError, check_fields
from llama2_mlx.formats.weights import check_state_dict, parameter_shapes
from llama2_mlx.io.distributed import World, world
from llama2_mlx.io.progress import ProgressBar, peak_memory_gb
from llama2_mlx.models.model import eval_mode
from llama2_mlx.training.checkpoint import (
    PARAMS_FILE,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llama2_mlx.training.data_parallel import (
    evaluate_shared,
    local_batches,
    shared_checkpoint,
    sum_step,
    sync_parameters,
)
from llama2_mlx.training.metrics import MetricsLog
from llama2_mlx.training.schedule import lr_schedule, make_optimizer

LossFn = Callable[[nn.Module, Any], tuple[mx.array, mx.array]]

# Settings a resumed run must share with its checkpoint (the rest may change);
# "warmup" is recorded as the run's warmup steps (warmup_ratio included).
RESUME_KEYS = ("lr", "warmup", "min_lr_ratio", "schedule", "weight_decay", "betas", "eps",
               "grad_accum", "seed", "total_steps", "batches_per_epoch")


@dataclass
class TrainConfig:
    """Optimizer, schedule, length, evaluation and checkpoint settings of a run.

    Give ``epochs`` or ``iters`` (optimizer steps); the learning rate warms up over
    ``warmup`` steps or, with ``warmup_ratio`` > 0, that share of the steps with
    ``warmup`` as the floor (never all of them: ``warmup=5, warmup_ratio=0.03`` is the
    paper's "3% of the steps, at least 5"); ``clip`` 0 disables clipping;
    ``val_every``/``save_every`` 0 disable periodic validation/checkpoints;
    checkpoints go to ``checkpoint_dir`` (none without it).

    The fields with a ``help`` are the training options of the commands (``lora-train``
    and the others): each default and help text is written here only.
    """

    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate.", "min": 0})
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps.", "min": 0})
    warmup_ratio: float = field(default=0.0, metadata={"min": 0, "below": 1})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "Cosine floor as a share of the peak.", "min": 0, "max": 1})
    schedule: str = "cosine"
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay.", "min": 0})
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata={"above": 0})
    clip: float = field(default=1.0, metadata={
        "help": "Clip gradients at this global norm (0: off).", "min": 0})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step.",
                                                 "min": 1})
    # Neither given: one epoch (__post_init__).
    epochs: Optional[float] = field(default=None, metadata={
        "help": "Epochs to train (instead of --iters).", "above": 0})
    iters: Optional[int] = field(default=None, metadata={
        "help": "Optimizer steps to train (instead of --epochs).", "min": 1})
    val_every: int = field(default=200, metadata={"help": "Validate every N steps (0: off).",
                                                  "min": 0})
    val_batches: int = field(default=25, metadata={"help": "Validation batches (-1: all).",
                                                   "min": -1})
    val_at_start: bool = True
    save_every: int = field(default=100, metadata={
        "help": "Checkpoint every N steps (0: at the end only).", "min": 0})
    keep_checkpoints: int = field(default=2, metadata={"min": 0})
    checkpoint_dir: Optional[Path] = None
    resume: bool = field(default=False, metadata={
        "help": "Continue from the newest checkpoint of the output folder."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an earlier run's results in the output folder (kept until this "
                "run's first checkpoint)."})
    grad_checkpoint: bool = field(default=False, metadata={
        "help": "Recompute activations in backward (less memory)."})
    seed: int = field(default=0, metadata={
        "help": "Random seed (data order, initialization, dropout).", **SEED_RANGE})
    progress: bool = field(default=True, metadata={
        "help": "Show the progress bar (--no-progress: no bar, and no log lines off a terminal)."})
    log_every: int = field(default=10, metadata={
        "help": "Off a terminal (stderr to a log file): a line with the loss every N steps "
                "(0: none).", "min": 0})
    description: str = "train"

    def __post_init__(self):
        if self.epochs is not None and self.iters is not None:
            raise OptionError("give {epochs} or {iters}, not both")
        if self.epochs is None and self.iters is None:
            self.epochs = 1
        check_fields(self)  # the ranges in the fields' metadata

    def micro_batches(self, per_epoch: int) -> int:
        """Micro-batches of the run, given ``per_epoch`` batches an epoch."""
        if self.iters is not None:
            return self.iters * self.grad_accum
        return math.ceil(self.epochs * per_epoch)

    def total_steps(self, per_epoch: int) -> int:
        """Optimizer steps of the run, given ``per_epoch`` batches an epoch."""
        return math.ceil(self.micro_batches(per_epoch) / self.grad_accum)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` (see ``warmup_ratio``)."""
        if not self.warmup_ratio:
            return self.warmup
        steps = max(self.warmup, round(self.warmup_ratio * total_steps))
        return max(0, min(steps, total_steps - 1))


class StopTraining(Exception):
    """Raised by an ``on_step`` callback to end the run after the current step."""


@dataclass
class TrainResult:
    """What a run did: per-step losses and learning rates, validation losses, throughput."""

    steps: int = 0
    total_steps: int = 0
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    last_checkpoint: Optional[Path] = None
    resumed_from: Optional[int] = None
    stopped: bool = False

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, max_batches: int = -1,
    world: Optional[World] = None,
) -> tuple[float, int]:
    """(mean loss, count) over ``batches`` (the first ``max_batches`` of them unless -1);
    with a ``world`` of several ranks (all calling this) the batches are shared out."""
    if world is not None and world.size > 1:
        with eval_mode(model):
            total, count = evaluate_shared(model, loss_fn, batches, max_batches, world)
        n = int(count.item())
        return (total.item() / n if n else float("nan")), n
    total, count = mx.array(0.0), mx.array(0)
    with eval_mode(model):
        for i, batch in enumerate(batches):
            if 0 <= max_batches <= i:
                break
            s, n = loss_fn(model, batch)
            total, count = total + s.astype(mx.float32), count + n
            mx.eval(total, count)
    n = int(count.item())
    return (total.item() / n if n else float("nan")), n


def set_grad_checkpoint(model: nn.Module, on: bool = True) -> None:
    """Recompute each transformer block in the backward pass (less memory, ~30% slower)."""
    for _, m in model.named_modules():
        if hasattr(m, "checkpoint_blocks"):
            m.checkpoint_blocks = on


def restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, flat: dict) -> None:
    """Set ``optimizer``'s state for ``model``'s trainable parameters from a checkpoint's
    flat optimizer state (``load_checkpoint``)."""
    optimizer.init(model.trainable_parameters())

    def pick(path, value):
        if path not in flat:
            raise OptionError("{resume}: optimizer state has no entry {path}", path=path)
        return flat[path]

    optimizer.state = tree_map_with_path(pick, optimizer.state)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[int], Sequence],
    config: TrainConfig,
    *,
    val_batches: Optional[Callable[[], Iterable]] = None,
    on_save: Optional[Callable[[nn.Module, int], None]] = None,
    on_step: Optional[Callable[[int, dict], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    metrics: Optional[MetricsLog] = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``loss_fn`` over ``train_batches(epoch)``.

    ``val_batches()`` yields validation batches; ``on_save(model, step)`` writes
    the run's artefacts (called at each checkpoint and at the end);
    ``on_step(step, metrics)`` may raise ``StopTraining``. A non-finite loss or
    gradient norm raises ``Llama2Error`` before the update, leaving the last
    good checkpoint and artefacts untouched. ``metrics`` gets a "train" record each
    step and a "val" record each validation (a resumed run first drops the records
    past its checkpoint's step, ``MetricsLog.restart``).
    """
    run = _Run(model, loss_fn, train_batches, config, val_batches=val_batches,
               on_save=on_save, on_step=on_step, say=log or (lambda s: None), metrics=metrics)
    return run.loop()


class _Run:
    """One ``train`` call: ``__init__`` runs the setup steps (model, data, optimizer and
    schedule, resume), ``loop`` the training loop, which the other methods serve."""

    def __init__(self, model, loss_fn, train_batches, config: TrainConfig, *,
                 val_batches, on_save, on_step, say, metrics: Optional[MetricsLog] = None):
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.world = world()  # one process unless started by mlx.launch
        say = self.world.main_only(say)
        self.val_batches, self.on_save, self.on_step, self.say = val_batches, on_save, on_step, say
        self.metrics = metrics if self.world.is_main else None  # rank 0 alone writes files
        self.ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        # The model first: a run it refuses must not remove an earlier run's checkpoints.
        self._setup_model()
        self._setup_data(train_batches)
        self._setup_optimizer()
        self.result = TrainResult(total_steps=self.total_steps)
        self.start = self._setup_resume()
        sync_parameters(self.world, self.model)  # all ranks start from rank 0's parameters
        if self.metrics is not None:
            self.metrics.restart(self.start if config.resume else -1)

    # ------------------------------------------------------------------ setup

    def _setup_model(self) -> None:
        """Gradient checkpointing as configured and the loss-and-gradient function."""
        model = self.model
        if self.config.grad_checkpoint and any(
            isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()
        ):
            # The backward pass recomputes each block and would draw other dropout masks.
            raise OptionError("{grad_checkpoint} cannot be combined with {dropout} > 0")
        set_grad_checkpoint(model, self.config.grad_checkpoint)
        self.loss_and_grad = nn.value_and_grad(model, self.loss_fn)

    def _setup_data(self, train_batches: Callable[[int], Sequence]) -> None:
        """The run's length from the data: batches an epoch, micro-batches and steps."""
        self.train_batches = train_batches
        self.per_epoch = len(train_batches(0))
        if self.per_epoch == 0:
            raise Llama2Error("no training batches")
        self.total_micro = self.config.micro_batches(self.per_epoch)
        self.total_steps = self.config.total_steps(self.per_epoch)
        self.epoch_cache: dict[int, Sequence] = {}

    def _setup_optimizer(self) -> None:
        """The learning-rate schedule, the optimizer and the settings a resumed run must
        share with its checkpoint (``fingerprint``)."""
        config, total = self.config, self.total_steps
        warmup = config.warmup_steps(total)
        self.schedule = lr_schedule(config.lr, total, warmup, config.min_lr_ratio, config.schedule)
        self.optimizer = make_optimizer(config, self.schedule)
        self.fingerprint = {
            **{k: getattr(config, k) for k in RESUME_KEYS if hasattr(config, k)}, "warmup": warmup,
            "betas": list(config.betas), "total_steps": total, "batches_per_epoch": self.per_epoch,
        }

    def _setup_resume(self) -> int:
        """The step the run starts at: with ``resume``, the last checkpoint's (its weights,
        optimizer state and history restored); else 0."""
        ckpt_dir, result = self.ckpt_dir, self.result
        if not self.config.resume:
            if ckpt_dir is not None and self.world.is_main and list_checkpoints(ckpt_dir):
                # A fresh run must not mix its checkpoints with an older run's, nor remove
                # them: the commands set an earlier run aside first (io.outdir.claim_output).
                raise OptionError("{checkpoint_dir}: {path} holds checkpoints of an earlier "
                                  "run; {resume} continues it", path=ckpt_dir)
            return 0
        if ckpt_dir is None:
            raise OptionError("{resume} needs a checkpoint folder")
        path, params, opt_state, state = shared_checkpoint(
            self.world, lambda: load_checkpoint(ckpt_dir, say=self.say))
        self._check_checkpoint(path, params, state)
        self.model.load_weights(list(params.items()), strict=False)
        restore_optimizer(self.optimizer, self.model, opt_state)
        start = state["step"]
        result.train_losses = [tuple(x) for x in state.get("train_losses", [])]
        result.learning_rates = [tuple(x) for x in state.get("learning_rates", [])]
        result.val_losses = [tuple(x) for x in state.get("val_losses", [])]
        result.resumed_from, result.last_checkpoint, result.steps = start, path, start
        self.world.note(f"last complete checkpoint: {path}")
        return start

    def _check_checkpoint(self, path: Path, params: dict, state: dict) -> None:
        """Refuse a checkpoint of other settings or of other trainable parameters."""
        for k, v in self.fingerprint.items():
            if state["fingerprint"].get(k) != v:
                raise OptionError("{resume}: {path} was made with {key}={old!r}, this run has "
                                  "{key}={new!r}", path=path, key=k,
                                  old=state["fingerprint"].get(k), new=v)
        check_state_dict(params, parameter_shapes(self.model, trainable=True), path / PARAMS_FILE,
                         what="this run's trainable parameters (--resume)")

    # ------------------------------------------------------------------ the loop

    def loop(self) -> TrainResult:
        """Train from ``start`` to the last step (or until ``on_step`` stops the run)."""
        config, result, total = self.config, self.result, self.total_steps
        self.model.train()
        mx.reset_peak_memory()
        columns = ("loss {loss}", "lr {lr}", "{tps} tok/s", "peak {mem} GB")
        with ProgressBar(config.description, total, columns, completed=self.start,
                         enabled=config.progress and self.world.is_main, every=config.log_every) as bar:
            if self.start == 0 and config.val_every > 0 and config.val_at_start:
                self._validate(0, bar)
            tic = time.perf_counter()
            for step in range(self.start, total):
                loss, lr, norm, tokens = self._step(step)
                done, elapsed = step + 1, time.perf_counter() - tic
                tps, mem = tokens / elapsed if elapsed else 0.0, peak_memory_gb()
                self._record(done, loss, lr, tokens, elapsed)
                if self.metrics is not None:
                    self.metrics.write("train", done, train_loss=loss, lr=lr, grad_norm=norm,
                                       tokens_per_sec=round(tps, 1), peak_memory_gb=round(mem, 4))
                bar.update(done, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}",
                           mem=f"{mem:.2f}")
                if config.val_every > 0 and (done % config.val_every == 0 or done == total):
                    self._validate(done, bar)
                stop = self._stop_requested(done, {"loss": loss, "lr": lr, "grad_norm": norm,
                                                   "tokens": tokens})
                if done == total or (config.save_every > 0 and done % config.save_every == 0):
                    self._checkpoint(done)
                if stop:
                    result.stopped = True
                    break
                tic = time.perf_counter()
        result.peak_memory_gb = peak_memory_gb()
        resumed = f" (resumed at step {self.start} of {total})" if config.resume else ""
        self.say(
            f"trained {result.steps - self.start} steps{resumed} in {result.seconds:.1f}s, "
            f"{result.tokens_per_sec:,.0f} tokens/s, peak memory {result.peak_memory_gb:.2f} GB"
        )
        return result

    def _micro_batch(self, m: int):
        """Micro-batch ``m`` of the run: batch ``m % per_epoch`` of epoch ``m // per_epoch``."""
        batches, i = self._micro_source(m)
        return batches[i]

    def _micro_source(self, m: int):
        """(the batches of micro-batch ``m``'s epoch, its index there)."""
        e = m // self.per_epoch
        if e not in self.epoch_cache:
            self.epoch_cache.clear()
            self.epoch_cache[e] = self.train_batches(e)
            if len(self.epoch_cache[e]) != self.per_epoch:
                raise Llama2Error(f"epoch {e} has {len(self.epoch_cache[e])} batches, "
                                  f"not {self.per_epoch}")
        return self.epoch_cache[e], m % self.per_epoch

    def _local_batches(self, step: int):
        """(dropout seed, batch) of this rank's share of a step (all of it on one process)."""
        ga, seed = self.config.grad_accum, self.config.seed
        ms = range(step * ga, min((step + 1) * ga, self.total_micro))
        if self.world.size == 1:
            return ((seed * 1_000_003 + m, self._micro_batch(m)) for m in ms)
        return local_batches([(m, *self._micro_source(m)) for m in ms], self.world, seed)

    def _gradients(self, step: int):
        """(gradients, loss, tokens) of a step: summed over its micro-batches (and the
        ranks), the gradients and loss divided by the number of items they sum over."""
        grads, loss_sum, count, tokens = None, mx.array(0.0), mx.array(0), 0
        for key, batch in self._local_batches(step):
            mx.random.seed(key)  # dropout: same on resume
            (s, n), g = self.loss_and_grad(self.model, batch)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_sum, count = loss_sum + s.astype(mx.float32), count + n
            mx.eval(grads, loss_sum, count)
            tokens += int(getattr(batch, "num_tokens", 0) or int(n))
        if self.world.size > 1:
            grads, loss_sum, count, tokens = sum_step(
                self.world, grads, loss_sum, count, tokens, self.model.trainable_parameters(),
                step)
        n_items = max(int(count.item()), 1)
        return tree_map(lambda g: g / n_items, grads), loss_sum.item() / n_items, tokens

    def _step(self, step: int) -> tuple[float, float, float, int]:
        """One optimizer update; (loss, learning rate, gradient norm, tokens) of the step.
        A non-finite loss or norm raises before the update."""
        grads, loss, tokens = self._gradients(step)
        if self.config.clip > 0:
            grads, norm = optim.clip_grad_norm(grads, self.config.clip)
        else:
            norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        norm = norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            kept = self.result.last_checkpoint or "none (no checkpoint was written yet)"
            raise Llama2Error(
                f"training diverged at step {step + 1}: {what}; stopped before the update, "
                f"last good checkpoint: {kept}"
            )
        lr = self.schedule(step).item()
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return loss, lr, norm, tokens

    def _record(self, done: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        r = self.result
        r.seconds += seconds
        r.tokens += tokens
        r.steps = done
        r.train_losses.append((done, loss))
        r.learning_rates.append((done, lr))

    def _validate(self, step: int, bar: ProgressBar) -> None:
        if self.val_batches is None:
            return
        tic = time.perf_counter()
        loss, n = evaluate(self.model, self.loss_fn, self.val_batches(), self.config.val_batches,
                           self.world)
        self.result.val_losses.append((step, loss))
        if self.world.is_main:
            if self.metrics is not None:
                self.metrics.write("val", step, val_loss=loss)
            bar.log(f"step {step}: val loss {loss:.4f} ({n} targets, {time.perf_counter() - tic:.1f}s)")

    def _stop_requested(self, step: int, metrics: dict) -> bool:
        """Call ``on_step``; whether it asked to stop (raised ``StopTraining``)."""
        if self.on_step is None:
            return False
        try:
            self.on_step(step, metrics)
        except StopTraining:
            return True
        return False

    def _checkpoint(self, step: int) -> None:
        """Save a checkpoint (with a checkpoint folder) and call ``on_save``: on rank 0."""
        if not self.world.is_main:
            return
        if self.ckpt_dir is not None:
            ga, per_epoch, result = self.config.grad_accum, self.per_epoch, self.result
            state = {
                "fingerprint": self.fingerprint, "micro_batch": step * ga,
                "epoch": (step * ga) // per_epoch, "batch_in_epoch": (step * ga) % per_epoch,
                "seed": self.config.seed, "train_losses": result.train_losses,
                "learning_rates": result.learning_rates, "val_losses": result.val_losses,
            }
            params = dict(tree_flatten(self.model.trainable_parameters()))
            result.last_checkpoint = save_checkpoint(
                self.ckpt_dir, step, params, self.optimizer.state, state,
                self.config.keep_checkpoints,
            )
            self.world.note(f"last complete checkpoint: {result.last_checkpoint}")
        if self.on_save is not None:
            self.on_save(self.model, step)
