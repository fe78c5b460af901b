"""``llama2 lora-train``: LoRA supervised fine-tuning with answer-only loss."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DATA, add_command, cli_errors, eprint, opt
from cli.options import (
    BATCH_SIZE,
    CLIP,
    EPOCHS,
    GRAD_ACCUM,
    GRAD_CHECKPOINT,
    ITERS,
    KEYS,
    LOG_EVERY,
    MAX_SEQ_LENGTH,
    NUM_LAYERS,
    OVERWRITE,
    PROGRESS,
    RANK,
    RESUME,
    SAVE_EVERY,
    SCALE,
    SEED,
    SFT_DEFAULTS,
    DTypeOpt,
    ModelOpt,
    field_option,
    given,
)
from llama2_mlx.training import sft


@cli_errors
def lora_train(
    model: ModelOpt = None,
    data: Optional[str] = field_option(SFT_DEFAULTS.data, "data"),
    train: Optional[str] = field_option(SFT_DEFAULTS.data, "train"),
    valid: Optional[str] = field_option(SFT_DEFAULTS.data, "valid"),
    test: Optional[str] = field_option(SFT_DEFAULTS.data, "test"),
    adapter_path: Optional[str] = field_option(SFT_DEFAULTS, "adapter_path"),
    config: Annotated[Optional[str], opt("YAML or JSON file with any of these options.", DATA)] = None,
    preset: Annotated[Optional[str], opt("Hyperparameter preset: llama2-sft (the paper's SFT).", DATA)] = None,
    max_seq_length: Optional[int] = MAX_SEQ_LENGTH,
    pack: Optional[bool] = field_option(SFT_DEFAULTS.data, "pack", "--pack/--no-pack"),
    long_samples: Optional[str] = field_option(SFT_DEFAULTS.data, "long_samples"),
    rank: Optional[int] = RANK,
    scale: Optional[float] = SCALE,
    dropout: Optional[float] = field_option(SFT_DEFAULTS.lora, "dropout"),
    keys: Optional[str] = KEYS,
    num_layers: Optional[int] = NUM_LAYERS,
    batch_size: Optional[int] = BATCH_SIZE,
    grad_accum: Optional[int] = GRAD_ACCUM,
    lr: Optional[float] = field_option(SFT_DEFAULTS.train, "lr"),
    warmup: Optional[int] = field_option(SFT_DEFAULTS.train, "warmup"),
    min_lr_ratio: Optional[float] = field_option(SFT_DEFAULTS.train, "min_lr_ratio"),
    weight_decay: Optional[float] = field_option(SFT_DEFAULTS.train, "weight_decay"),
    clip: Optional[float] = CLIP,
    epochs: Optional[float] = EPOCHS,
    iters: Optional[int] = ITERS,
    val_every: Optional[int] = field_option(SFT_DEFAULTS.train, "val_every"),
    val_batches: Optional[int] = field_option(SFT_DEFAULTS.train, "val_batches"),
    save_every: Optional[int] = SAVE_EVERY,
    resume: Optional[bool] = RESUME,
    overwrite: Optional[bool] = OVERWRITE,
    grad_checkpoint: Optional[bool] = GRAD_CHECKPOINT,
    seed: Optional[int] = SEED,
    progress: Optional[bool] = PROGRESS,
    log_every: Optional[int] = LOG_EVERY,
    dtype: DTypeOpt = None,
) -> None:
    """Fine-tune LoRA adapters on JSONL data; the loss counts only answer tokens."""
    # Every option is None unless given, so that --config and --preset can set it.
    cli = given(
        model=model, data=data, train=train, valid=valid, test=test, adapter_path=adapter_path,
        max_seq_length=max_seq_length, pack=pack, long_samples=long_samples, rank=rank,
        scale=scale, dropout=dropout, keys=keys, num_layers=num_layers, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, warmup=warmup, min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay, clip=clip, epochs=epochs, iters=iters, val_every=val_every,
        val_batches=val_batches, save_every=save_every, resume=resume, overwrite=overwrite,
        grad_checkpoint=grad_checkpoint, seed=seed, progress=progress, log_every=log_every,
        dtype=dtype,
    )
    result = sft.lora_train(sft.SFTOptions.resolve(cli, config_file=config, preset=preset),
                            log=eprint)
    # The results (stdout): the last validation loss and the test loss.
    if result.train.val_losses:
        step, loss = result.train.val_losses[-1]
        typer.echo(f"val loss {loss:.4f} (step {step})")
    if result.test_loss is not None:
        typer.echo(f"test loss {result.test_loss:.4f}, perplexity {result.test_ppl:.3f}")


def register(app: typer.Typer) -> None:
    add_command(app, "lora-train", lora_train)
