"""LoRA supervised fine-tuning with answer-only loss (``llama2 lora-train``).

``SFTOptions`` composes the adapters (``LoRAConfig``), the training run
(``TrainConfig``) and the data (``DataConfig``), as ``RewardTrainConfig`` does for
reward models. The options of ``lora-train`` are the fields with a ``help`` of these
(and of ``SFTOptions``): a config file names them the way the fields are named
(``rank``, ``max_seq_length`` or ``max-seq-length`` ...), whichever part holds them.
They come, in increasing priority, from the defaults (sized for LoRA), a ``--preset``,
a ``--config`` file (YAML or JSON) and the command line.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from llama2_mlx.errors import Llama2Error, OptionError, OptionText, check_fields
from llama2_mlx.io.distributed import world
from llama2_mlx.io.outdir import Claim, claim_output
from llama2_mlx.io.progress import log_stderr
from llama2_mlx.io.readers import exists, is_dir
from llama2_mlx.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    apply_lora,
    lora_layers,
    save_adapters,
    train_lora_only,
    trainable_count,
)
from llama2_mlx.training.config_file import read_config_file
from llama2_mlx.training.data import SFTBatches, fit_length, load_samples
from llama2_mlx.training.metrics import METRICS_FILE, MetricsLog
from llama2_mlx.training.trainer import TrainConfig, TrainResult, evaluate, train

# §3.1: cosine schedule, lr 2e-5, weight decay 0.1, batch 64, sequence length 4096,
# 2 epochs; the floor (10% of the peak) is the pretraining schedule's (§2.2).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-sft": dict(
        lr=2e-5, weight_decay=0.1, min_lr_ratio=0.1, effective_batch=64, batch_size=1,
        max_seq_length=4096, epochs=2, pack=True, clip=1.0,
    ),
}

# Not an option of any part: a preset or config file may give the effective batch
# instead of grad_accum, which is derived from it (and batch_size) when options resolve.
EFFECTIVE_BATCH = "effective_batch"


@dataclass
class DataConfig:
    """The SFT data: a folder (``data``) with train.jsonl, valid.jsonl and optional
    test.jsonl, or files one by one (``train``, ``valid``, ``test``), and how its samples
    become micro-batches of ``batch_size`` rows of ``max_seq_length`` tokens."""

    data: Optional[str] = field(default=None, metadata={
        "help": "Folder with train.jsonl, valid.jsonl and optional test.jsonl."})
    train: Optional[str] = field(default=None, metadata={
        "help": "Training JSONL file (default DATA/train.jsonl)."})
    valid: Optional[str] = field(default=None, metadata={
        "help": "Validation JSONL file (default DATA/valid.jsonl)."})
    test: Optional[str] = field(default=None, metadata={
        "help": "Test JSONL file (default DATA/test.jsonl)."})
    batch_size: int = field(default=4, metadata={"help": "Rows per micro-batch.", "min": 1})
    max_seq_length: int = field(default=2048, metadata={"help": "Row length in tokens.",
                                                        "min": 2})
    pack: bool = field(default=True, metadata={
        "help": "Pack samples into rows (--no-pack: padded batches)."})
    long_samples: str = field(default="error", metadata={
        "help": "Samples longer than a row: error, truncate or skip."})

    def __post_init__(self):
        check_fields(self)  # the ranges in the fields' metadata

    def file(self, split: str) -> Optional[Path]:
        """The JSONL file of ``split`` (train, valid or test): the one given (found in the
        ``data`` folder too), else the folder's ``{split}.jsonl`` if it has one."""
        given = getattr(self, split)
        if given is not None:
            p = Path(given)
            if not exists(p) and self.data is not None and exists(Path(self.data) / given):
                p = Path(self.data) / given
            if not exists(p):
                raise OptionError(f"{{{split}}}: {{path}} not found", path=p)
            return p
        if self.data is None:
            return None
        if not is_dir(self.data):
            raise OptionError("{data}: {got} is not a folder", got=self.data)
        p = Path(self.data) / f"{split}.jsonl"
        return p if exists(p) else None


@dataclass
class SFTOptions:
    """Every ``lora-train`` option (see ``llama2 lora-train --help``): the base model, the
    adapters' folder, and the adapters' (``lora``), run's (``train``) and data's
    (``data``) settings.

    ``resolve`` layers option values by name; ``settings`` gives them back by name."""

    model: Optional[str] = field(default=None, metadata={
        "help": "Base model folder or Hugging Face repo id."})
    dtype: Optional[str] = field(default=None, metadata={
        "help": "Compute dtype (default: the checkpoint's)."})
    adapter_path: str = field(default="adapters", metadata={
        "help": "Output folder of the adapters."})
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def resolve(
        cls, cli: Optional[dict] = None, config_file=None, preset: Optional[str] = None,
        defaults: Optional[dict] = None, config_option: str = "config",
    ) -> "SFTOptions":
        """Defaults < ``defaults`` (a caller's own, by option name) < ``preset`` <
        ``config_file`` (``config_file.read_config_file``; ``config_option`` names the option
        that gave it) < ``cli`` (by option name; its None values are unset)."""
        values: dict[str, Any] = {}
        _apply(values, defaults or {}, "defaults")
        if preset is not None:
            if preset not in PRESETS:
                raise OptionError("{preset}: unknown preset {got!r} (have {choices})",
                                  got=preset, choices=', '.join(PRESETS))
            _apply(values, PRESETS[preset], f"preset {preset}")
        file_values = (read_config_file(config_file, config_option)
                       if config_file is not None else {})
        if "preset" in file_values:
            p = file_values.pop("preset")
            if preset is None:
                return cls.resolve(cli, config_file, p, defaults, config_option)
        _apply(values, file_values, str(config_file))
        _apply(values, {k: v for k, v in (cli or {}).items() if v is not None}, "command line")
        effective = values.pop(EFFECTIVE_BATCH, None)
        if effective is not None and "grad_accum" not in values:
            bs = values.get("batch_size", DataConfig.batch_size)
            if effective % bs:
                raise OptionError("{batch_size} {bs} does not divide the effective batch {effective}",
                                  bs=bs, effective=effective)
            values["grad_accum"] = effective // bs
        return cls.from_settings(values)

    @classmethod
    def from_settings(cls, values: dict) -> "SFTOptions":
        """The options with ``values`` (option name -> value, see ``OPTION_PARTS``) set in
        the parts that hold them; the others keep their defaults."""
        parts: dict[Optional[str], dict] = {part: {} for part in OPTION_PARTS.values()}
        for name, value in values.items():
            parts[OPTION_PARTS[name]][name] = value
        return cls(**parts.pop(None), **{part: _PARTS[part](**v) for part, v in parts.items()})

    def settings(self) -> dict:
        """Every option by name, the shape of a ``--config`` file (``from_settings``
        reads it back)."""
        return {name: getattr(self if part is None else getattr(self, part), name)
                for name, part in OPTION_PARTS.items()}

    def with_options(self, **options) -> "SFTOptions":
        """A copy with ``options`` (by option name: ``train`` is the training file) changed."""
        return self.from_settings({**self.settings(), **options})


_PARTS = {"lora": LoRAConfig, "train": TrainConfig, "data": DataConfig}


def _kind(hint) -> type:
    """The type an option's values are coerced to: ``Optional[int]`` -> int,
    ``tuple[str, ...]`` -> tuple."""
    if typing.get_origin(hint) is typing.Union:
        return _kind(next(a for a in typing.get_args(hint) if a is not type(None)))
    return typing.get_origin(hint) or hint


def _option_table() -> tuple[dict[str, Optional[str]], dict[str, type]]:
    parts, kinds = {}, {EFFECTIVE_BATCH: int}
    for part, cls in [(None, SFTOptions), *_PARTS.items()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                parts[f.name], kinds[f.name] = part, _kind(hints[f.name])
    return parts, kinds


# Option name -> the part of SFTOptions that holds it (None: SFTOptions itself), and
# option name -> its type (the pseudo-option effective_batch included).
OPTION_PARTS, _KINDS = _option_table()


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = _KINDS[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if kind is tuple:  # a comma-separated string is the part's to parse (LoRAConfig.keys)
            return value if isinstance(value, str) else tuple(value)
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
        if k not in _KINDS:
            raise Llama2Error(f"{where}: unknown option {k!r}")
        values[k] = _coerce(k, v, where) if v is not None else None
    # The later of epochs / iters wins.
    if layer.get("epochs") is not None:
        values.pop("iters", None)
    if layer.get("iters") is not None:
        values.pop("epochs", None)
    if "grad_accum" in layer and EFFECTIVE_BATCH not in layer:
        values.pop(EFFECTIVE_BATCH, None)


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
    """A ``lora_train`` run: the trainer's result, where the adapters went, each split's
    batch statistics and the test loss (with a test split)."""

    train: TrainResult
    adapter_path: Path
    data: dict = field(default_factory=dict)
    test_loss: Optional[float] = None

    @property
    def test_ppl(self) -> Optional[float]:
        return None if self.test_loss is None else math.exp(self.test_loss)


def lora_train(
    opts: SFTOptions, model: Optional[nn.Module] = None, tokenizer=None,
    log: Callable[[str], None] = log_stderr, *, lora_config: Optional[LoRAConfig] = None,
    description: str = "lora-train", metrics: Optional[MetricsLog] = None,
) -> SFTResult:
    """Fine-tune LoRA adapters on ``opts.data`` and write them to ``opts.adapter_path``.

    ``model``/``tokenizer`` default to loading ``opts.model``. Adapters ``model`` already
    has (``lora_config`` describes them) are trained further; else new ones are added
    (``opts.lora``). ``description`` labels the progress bar. The run's metrics go to
    ``metrics`` (default: ``metrics.jsonl`` in the adapter folder). Rows longer than the
    model's context are cut to it (with a note).
    """
    log = world().main_only(log)  # under mlx.launch rank 0 alone logs and writes
    # The options were checked when they were made; the output folder is claimed (locked,
    # writable, an earlier run kept) before the (slow) model load.
    if opts.data.file("train") is None:
        raise OptionError("no training data: give {data} DIR (with train.jsonl) or {train} FILE")
    with claim_output(opts.adapter_path, field="adapter_path", artefacts=ADAPTER_ARTEFACTS,
                      results=ADAPTER_RESULTS, resume=opts.train.resume,
                      overwrite=opts.train.overwrite, continues="{resume}", say=log,
                      world=world()) as claim:
        return _lora_train(opts, model, tokenizer, log, lora_config, description, metrics,
                           claim)


# What a lora-train run leaves in its folder, and those of them that are results to keep.
ADAPTER_ARTEFACTS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "checkpoints", METRICS_FILE)
ADAPTER_RESULTS = (ADAPTER_WEIGHTS, "checkpoints/step_*")


def _lora_train(opts: SFTOptions, model, tokenizer, log, lora_config, description, metrics,
                claim: Claim) -> SFTResult:
    """``lora_train`` in its claimed folder."""
    adapter_path = Path(opts.adapter_path)
    config = dataclasses.replace(opts.train, checkpoint_dir=adapter_path / "checkpoints",
                                 description=description)
    data = opts.data
    train_file = data.file("train")
    if model is None or tokenizer is None:
        if opts.model is None:
            raise OptionError("{model} is required")
        from llama2_mlx.checkpoints.load import load

        model, tokenizer = load(opts.model, dtype=opts.dtype)
    context = model.args.max_seq_len
    if data.max_seq_length > context:
        log(OptionText("{max_seq_length} {got} is above the model's context of {context} "
                       "tokens: rows of {context} tokens are used", got=data.max_seq_length,
                       context=context))
        data = dataclasses.replace(data, max_seq_length=context)
    splits = {}
    for split in ("train", "valid", "test"):
        path = train_file if split == "train" else data.file(split)
        if path is None:
            if split == "valid" and data.data is not None:
                log(f"no valid.jsonl in {Path(data.data).resolve()}: training without validation")
            continue
        samples, report = fit_length(load_samples(path, tokenizer), data.max_seq_length,
                                     data.long_samples)
        if (msg := report.message(str(path), data.max_seq_length + 1)) is not None:
            log(msg)
        if not samples:
            raise OptionError("{path}: no sample left after {long_samples} {got}",
                              path=path, got=data.long_samples)
        shuffle = split == "train"
        splits[split] = SFTBatches(samples, data.batch_size, data.max_seq_length, data.pack,
                                   config.seed, shuffle=shuffle)
    stats = {}
    for split, b in splits.items():
        st = b.stats()
        stats[split] = dataclasses.asdict(st) | {"fill": st.fill}
        log(f"{split}: {st.samples} samples in {st.batches} batches ({st.rows} rows), "
            f"{st.targets:,} target tokens, {st.fill:.1%} non-padding tokens"
            + (" (packed)" if data.pack else " (padded)"))

    mx.random.seed(config.seed)
    lora_cfg = opts.lora
    if lora_layers(model):
        if lora_config is None:
            raise ValueError("the model has LoRA layers: pass their LoRAConfig")
        lora_cfg = lora_config
        train_lora_only(model)
    else:
        apply_lora(model, lora_cfg)
    trainable, total = trainable_count(model)
    log(f"LoRA: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")

    settings = {k: v for k, v in opts.settings().items()
                if k not in ("progress", "log_every", "overwrite")}
    settings["max_seq_length"] = data.max_seq_length

    def on_save(m, step):
        save_adapters(m, adapter_path, lora_cfg, step=step, training=settings)
        claim.commit()  # this run has a checkpoint: an earlier run set aside is dropped

    valid = splits.get("valid")
    result = train(
        model, sft_loss, splits["train"], config,
        val_batches=(lambda: valid(0)) if valid is not None else None,
        on_save=on_save, log=log,
        metrics=metrics if metrics is not None else MetricsLog(adapter_path / METRICS_FILE),
    )
    out = SFTResult(result, adapter_path, stats)
    if "test" in splits:
        out.test_loss, n = evaluate(model, sft_loss, splits["test"](0), world=world())
        log(f"test loss {out.test_loss:.4f}, perplexity {out.test_ppl:.3f} ({n:,} target tokens)")
    log(f"adapters written to {adapter_path.resolve()}")
    return out
