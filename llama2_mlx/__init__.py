"""Llama 2 on MLX: a Meta-faithful runtime, LoRA fine-tuning and a light RLHF loop.

The public API; each name is imported on first use (PEP 562), so ``import llama2_mlx``
stays cheap and loads MLX only when a model is touched::

    from llama2_mlx import load, generate
    model, tokenizer = load("meta-llama/Llama-2-7b-chat-hf")

Packages, bottom to top (each imports only from those below it; see
docs/architecture.md): ``errors`` -> ``io`` (files, hub, progress) -> ``chat`` (the
tokenizer and Meta's chat format) -> ``formats`` (the weight table, .pth, safetensors,
GGUF) -> ``models`` (the model, KV caches, LoRA) -> ``checkpoints`` (load, save,
convert, fuse) -> ``generation`` / ``training`` -> ``rlhf``, ``demo`` (features).
"""

from __future__ import annotations

import importlib

# First of all, before anything imports mlx: an optimized BLAS for MLX's CPU
# matmuls on Linux (it only takes effect if loaded before mlx.core; see blas.py).
from llama2_mlx import blas

blas.setup()

# name -> module that defines it
_API = {
    "Llama2Error": "llama2_mlx.errors",
    "Tokenizer": "llama2_mlx.chat.tokenizer",
    "ModelArgs": "llama2_mlx.models.model",
    "Transformer": "llama2_mlx.models.model",
    "LoRAConfig": "llama2_mlx.models.lora",
    "load": "llama2_mlx.checkpoints.load",
    "load_model": "llama2_mlx.checkpoints.load",
    "save_model": "llama2_mlx.checkpoints.export",
    "convert": "llama2_mlx.checkpoints.export",
    "quantize": "llama2_mlx.checkpoints.export",
    "fuse": "llama2_mlx.checkpoints.fuse",
    "GenerationConfig": "llama2_mlx.generation.generate",
    "generate": "llama2_mlx.generation.generate",
    "stream_generate": "llama2_mlx.generation.generate",
    "batch_generate": "llama2_mlx.generation.generate",
    "sample_k": "llama2_mlx.generation.generate",
    "SFTOptions": "llama2_mlx.training.sft",
    "DataConfig": "llama2_mlx.training.sft",
    "TrainConfig": "llama2_mlx.training.trainer",
    "lora_train": "llama2_mlx.training.sft",
    "RewardModel": "llama2_mlx.rlhf.reward_model",
    "load_reward_model": "llama2_mlx.rlhf.reward_model",
    "RewardTrainConfig": "llama2_mlx.rlhf.reward",
    "train_reward_model": "llama2_mlx.rlhf.reward",
    "RSConfig": "llama2_mlx.rlhf.rejection",
    "rejection_sample": "llama2_mlx.rlhf.rejection",
    "RSLoopConfig": "llama2_mlx.rlhf.rs_loop",
    "rs_loop": "llama2_mlx.rlhf.rs_loop",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'llama2_mlx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
