"""``llama2 lora-train``: LoRA supervised fine-tuning with answer-only loss."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import LORA as _P
from cli.common import TRAINING as _T
from cli.common import DType, cli_errors, dtype_name, opt


@cli_errors
def lora_train(
    model: Annotated[Optional[str], opt("Base model folder or Hugging Face repo id.", _D, "--model", "-m")] = None,
    data: Annotated[Optional[str], opt("Folder with train.jsonl, valid.jsonl and optional test.jsonl.", _D)] = None,
    train: Annotated[Optional[str], opt("Training JSONL file (default DATA/train.jsonl).", _D)] = None,
    valid: Annotated[Optional[str], opt("Validation JSONL file (default DATA/valid.jsonl).", _D)] = None,
    test: Annotated[Optional[str], opt("Test JSONL file (default DATA/test.jsonl).", _D)] = None,
    adapter_path: Annotated[Optional[str], opt("Output folder of the adapters (default: adapters).", _D)] = None,
    config: Annotated[Optional[str], opt("YAML or JSON file with any of these options.", _D)] = None,
    preset: Annotated[Optional[str], opt("Hyperparameter preset: llama2-sft (the paper's SFT).", _D)] = None,
    max_seq_length: Annotated[Optional[int], opt("Row length in tokens (default: 2048).", _D)] = None,
    pack: Annotated[Optional[bool], opt("Pack samples into rows (--no-pack: padded batches) (default: pack).", _D, "--pack/--no-pack")] = None,
    long_samples: Annotated[Optional[str], opt("Samples longer than a row: error, truncate or skip (default: error).", _D)] = None,
    rank: Annotated[Optional[int], opt("LoRA rank (default: 8).", _P)] = None,
    scale: Annotated[Optional[float], opt("LoRA scale (default: 20).", _P)] = None,
    dropout: Annotated[Optional[float], opt("LoRA dropout (default: 0).", _P)] = None,
    keys: Annotated[Optional[str], opt("Comma-separated projections to adapt, e.g. q_proj,v_proj, attn, mlp (default: all).", _P)] = None,
    num_layers: Annotated[Optional[int], opt("Adapt the last N layers (-1: all) (default: -1).", _P)] = None,
    batch_size: Annotated[Optional[int], opt("Rows per micro-batch (default: 4).")] = None,
    grad_accum: Annotated[Optional[int], opt("Micro-batches per optimizer step (default: 1).")] = None,
    lr: Annotated[Optional[float], opt("Peak learning rate (default: 1e-5).")] = None,
    warmup: Annotated[Optional[int], opt("Linear warmup steps (default: 0).")] = None,
    min_lr_ratio: Annotated[Optional[float], opt("Cosine floor as a share of the peak (default: 0.1).")] = None,
    weight_decay: Annotated[Optional[float], opt("AdamW weight decay (default: 0.01).")] = None,
    clip: Annotated[Optional[float], opt("Clip gradients at this global norm (0: off) (default: 1.0).")] = None,
    epochs: Annotated[Optional[float], opt("Epochs to train (default 1 unless --iters).")] = None,
    iters: Annotated[Optional[int], opt("Optimizer steps to train (instead of --epochs).")] = None,
    val_every: Annotated[Optional[int], opt("Validate every N steps (0: off) (default: 200).")] = None,
    val_batches: Annotated[Optional[int], opt("Validation batches (-1: all) (default: 25).")] = None,
    save_every: Annotated[Optional[int], opt("Checkpoint every N steps (default: 100).")] = None,
    resume: Annotated[Optional[bool], opt("Continue from the newest checkpoint in ADAPTER_PATH/checkpoints.", _T, "--resume")] = None,
    grad_checkpoint: Annotated[Optional[bool], opt("Recompute activations in backward (less memory).", _T, "--grad-checkpoint")] = None,
    seed: Annotated[Optional[int], opt("Random seed (data order, LoRA init, dropout) (default: 0).")] = None,
    dtype: Annotated[Optional[DType], opt("Base model dtype (default: the checkpoint's).")] = None,
) -> None:
    """Fine-tune LoRA adapters on JSONL data; the loss counts only answer tokens."""
    from llama2_mlx.training.sft import SFTOptions
    from llama2_mlx.training.sft import lora_train as run

    cli = {k: v for k, v in locals().items() if k not in ("config", "preset", "run", "SFTOptions")}
    cli["dtype"] = dtype_name(dtype)
    run(SFTOptions.resolve(cli, config_file=config, preset=preset))


def register(app: typer.Typer) -> None:
    app.command("lora-train")(lora_train)
