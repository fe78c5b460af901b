"""LoRA supervised fine-tuning with answer-only loss (``llama2 lora-train``).

Options come, in increasing priority, from the defaults (sized for LoRA), a
``--preset``, a ``--config`` file (YAML or JSON, the same option names) and the
command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from llama2_mlx.errors import Llama2Error
from llama2_mlx.io.distributed import world
from llama2_mlx.io.progress import log_stderr
from llama2_mlx.models.lora import (
    DEFAULT_KEYS,
    LoRAConfig,
    apply_lora,
    lora_layers,
    save_adapters,
    train_lora_only,
    trainable_count,
)
from llama2_mlx.training.data import SFTBatches, fit_length, load_samples
from llama2_mlx.training.trainer import TrainConfig, TrainResult, evaluate, train

# §3.1: cosine schedule, lr 2e-5, weight decay 0.1, batch 64, sequence length 4096,
# 2 epochs; the floor (10% of the peak) is the pretraining schedule's (§2.2).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-sft": dict(
        lr=2e-5, weight_decay=0.1, min_lr_ratio=0.1, effective_batch=64, batch_size=1,
        max_seq_length=4096, epochs=2, pack=True, clip=1.0,
    ),
}


@dataclass
class SFTOptions:
    """Every ``lora-train`` option (see ``llama2 lora-train --help``)."""

    model: Optional[str] = None
    data: Optional[str] = None
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None
    adapter_path: str = "adapters"
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: Optional[list] = None
    num_layers: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    effective_batch: Optional[int] = None
    lr: float = 1e-5
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    epochs: Optional[float] = None
    iters: Optional[int] = None
    max_seq_length: int = 2048
    pack: bool = True
    long_samples: str = "error"
    val_every: int = 200
    val_batches: int = 25
    save_every: int = 100
    resume: bool = False
    grad_checkpoint: bool = False
    seed: int = 0
    dtype: Optional[str] = None
    progress: bool = True

    @classmethod
    def resolve(
        cls, cli: Optional[dict] = None, config_file=None, preset: Optional[str] = None
    ) -> "SFTOptions":
        """Defaults < ``preset`` < ``config_file`` < ``cli`` (its None values are unset)."""
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise Llama2Error(f"--preset: unknown preset {preset!r} (have {', '.join(PRESETS)})")
            _apply(values, PRESETS[preset], f"preset {preset}")
        file_values = read_config_file(config_file) if config_file is not None else {}
        if "preset" in file_values:
            p = file_values.pop("preset")
            if preset is None:
                return cls.resolve(cli, config_file, p)
        _apply(values, file_values, str(config_file))
        _apply(values, {k: v for k, v in (cli or {}).items() if v is not None}, "command line")
        if values.get("effective_batch") is not None and "grad_accum" not in values:
            eff, bs = values["effective_batch"], values.get("batch_size", cls.batch_size)
            if eff % bs:
                raise Llama2Error(f"--batch-size {bs} does not divide the effective batch {eff}")
            values["grad_accum"] = eff // bs
        return cls(**values)


_FIELDS = {f.name: f for f in dataclasses.fields(SFTOptions)}


def _coerce(name: str, value: Any, where: str) -> Any:
    default = _FIELDS[name].default
    kind = type(default) if default is not None else {
        "epochs": float, "iters": int, "effective_batch": int, "keys": list,
    }.get(name, str)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if kind is list:
            return [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise Llama2Error(f"{where}: option {name} = {value!r} is not a {kind.__name__}") from None


def _apply(values: dict, layer: dict, where: str) -> None:
    layer = {k.replace("-", "_"): v for k, v in layer.items()}
    if layer.get("epochs") is not None and layer.get("iters") is not None:
        raise Llama2Error(f"{where}: give epochs or iters, not both")
    for k, v in layer.items():
        if k not in _FIELDS:
            raise Llama2Error(f"{where}: unknown option {k!r}")
        values[k] = _coerce(k, v, where) if v is not None else None
    # The later of epochs / iters wins.
    if layer.get("epochs") is not None:
        values.pop("iters", None)
    if layer.get("iters") is not None:
        values.pop("epochs", None)
    if "grad_accum" in layer and "effective_batch" not in layer:
        values.pop("effective_batch", None)


def read_config_file(path) -> dict:
    """The options of a YAML or JSON config file (a mapping of option names)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise Llama2Error(f"--config: {path} not found") from None
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise Llama2Error(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise Llama2Error(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise Llama2Error(f"{path}: expected a mapping of option names to values")
    return values


def resolve_keys(keys: Optional[list]) -> tuple[str, ...]:
    """Full block-relative names for ``--keys`` (``q_proj`` means ``self_attn.q_proj``)."""
    if not keys:
        return DEFAULT_KEYS
    short = {k.rsplit(".", 1)[-1]: k for k in DEFAULT_KEYS}
    out = []
    for k in keys:
        if k in ("all",):
            out += DEFAULT_KEYS
        elif k in ("attn", "attention"):
            out += DEFAULT_KEYS[:4]
        elif k == "mlp":
            out += DEFAULT_KEYS[4:]
        else:
            out.append(short.get(k, k))
    return tuple(dict.fromkeys(out))


def sft_loss(model: nn.Module, batch) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the batch's target tokens, and their number.

    Logits are computed only at target positions (the answer tokens).
    """
    h = model.model(batch.inputs, mask=batch.mask)  # (B, T, dim)
    h = h.reshape(-1, h.shape[-1])[batch.target_index]  # (N, dim)
    logits = model.lm_head(h).astype(mx.float32)  # (N, vocab)
    targets = batch.targets.reshape(-1)[batch.target_index]
    ce = nn.losses.cross_entropy(logits, targets)
    return ce.sum(), mx.array(batch.num_targets)


def token_losses(model: nn.Module, batch) -> mx.array:
    """(B, T) per-position cross-entropy, zero where the position is not a target."""
    logits = model(batch.inputs, mask=batch.mask).astype(mx.float32)
    return nn.losses.cross_entropy(logits, batch.targets) * batch.weights


@dataclass
class SFTResult:
    train: TrainResult
    adapter_path: Path
    data: dict = field(default_factory=dict)
    test_loss: Optional[float] = None

    @property
    def test_ppl(self) -> Optional[float]:
        return None if self.test_loss is None else math.exp(self.test_loss)


def _data_file(opts: SFTOptions, split: str) -> Optional[Path]:
    given = getattr(opts, split)
    if given is not None:
        p = Path(given)
        if not p.exists() and opts.data is not None and (Path(opts.data) / given).exists():
            p = Path(opts.data) / given
        if not p.exists():
            raise Llama2Error(f"--{split}: {p} not found")
        return p
    if opts.data is None:
        return None
    if not Path(opts.data).is_dir():
        raise Llama2Error(f"--data: {opts.data} is not a folder")
    p = Path(opts.data) / f"{split}.jsonl"
    return p if p.exists() else None


def lora_train(
    opts: SFTOptions, model: Optional[nn.Module] = None, tokenizer=None,
    log: Callable[[str], None] = log_stderr, *, lora_config: Optional[LoRAConfig] = None,
    description: str = "lora-train",
) -> SFTResult:
    """Fine-tune LoRA adapters on ``opts.data`` and write them to ``opts.adapter_path``.

    ``model``/``tokenizer`` default to loading ``opts.model``. Adapters ``model`` already
    has (``lora_config`` describes them) are trained further; else new ones are added
    (``opts.rank`` ...). ``description`` labels the progress bar.
    """
    log = world().main_only(log)  # under mlx.launch rank 0 alone logs and writes
    # Check the options before the (slow) model load.
    lora_cfg = LoRAConfig(opts.rank, opts.scale, opts.dropout, resolve_keys(opts.keys),
                          opts.num_layers)
    adapter_path = Path(opts.adapter_path)
    config = TrainConfig(
        lr=opts.lr, warmup=opts.warmup, min_lr_ratio=opts.min_lr_ratio,
        weight_decay=opts.weight_decay, clip=opts.clip, grad_accum=opts.grad_accum,
        epochs=opts.epochs, iters=opts.iters, val_every=opts.val_every,
        val_batches=opts.val_batches, save_every=opts.save_every,
        checkpoint_dir=adapter_path / "checkpoints", resume=opts.resume,
        grad_checkpoint=opts.grad_checkpoint, seed=opts.seed, progress=opts.progress,
        description=description,
    )
    train_file = _data_file(opts, "train")
    if train_file is None:
        raise Llama2Error("no training data: give --data DIR (with train.jsonl) or --train FILE")
    if model is None or tokenizer is None:
        if opts.model is None:
            raise Llama2Error("--model is required")
        from llama2_mlx.checkpoints.load import load

        model, tokenizer = load(opts.model, dtype=opts.dtype)
    splits = {}
    for split in ("train", "valid", "test"):
        path = train_file if split == "train" else _data_file(opts, split)
        if path is None:
            continue
        samples, report = fit_length(load_samples(path, tokenizer), opts.max_seq_length,
                                     opts.long_samples)
        if (msg := report.message(str(path), opts.max_seq_length + 1)) is not None:
            log(msg)
        if not samples:
            raise Llama2Error(f"{path}: no sample left after --long-samples {opts.long_samples}")
        shuffle = split == "train"
        splits[split] = SFTBatches(samples, opts.batch_size, opts.max_seq_length, opts.pack,
                                   opts.seed, shuffle=shuffle)
    data = {}
    for split, b in splits.items():
        st = b.stats()
        data[split] = dataclasses.asdict(st) | {"fill": st.fill}
        log(f"{split}: {st.samples} samples in {st.batches} batches ({st.rows} rows), "
            f"{st.targets:,} target tokens, {st.fill:.1%} non-padding tokens"
            + (" (packed)" if opts.pack else " (padded)"))

    mx.random.seed(opts.seed)
    if lora_layers(model):
        if lora_config is None:
            raise ValueError("the model has LoRA layers: pass their LoRAConfig")
        lora_cfg = lora_config
        train_lora_only(model)
    else:
        apply_lora(model, lora_cfg)
    trainable, total = trainable_count(model)
    log(f"LoRA: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")

    settings = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}

    def on_save(m, step):
        save_adapters(m, adapter_path, lora_cfg, step=step, training=settings)

    valid = splits.get("valid")
    result = train(
        model, sft_loss, splits["train"], config,
        val_batches=(lambda: valid(0)) if valid is not None else None,
        on_save=on_save, log=log,
    )
    out = SFTResult(result, adapter_path, data)
    if "test" in splits:
        out.test_loss, n = evaluate(model, sft_loss, splits["test"](0), world=world())
        log(f"test loss {out.test_loss:.4f}, perplexity {out.test_ppl:.3f} ({n:,} target tokens)")
    log(f"adapters written to {adapter_path}")
    return out
