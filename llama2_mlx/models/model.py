"""The Llama 2 transformer (Touvron et al. 2023, §2.2) as MLX modules.

Weights use one internal naming, the Hugging Face / mlx-lm one
(``model.layers.{i}.self_attn.q_proj.weight`` ...), with q/k rows in the
rotate-half RoPE order. The loader maps Meta's checkpoints onto it.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from llama2_mlx.formats.config import HF_KEYS, check_fields, check_hf_config, check_value


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # HF's config.json states the FFN size outright; Meta's params.json derives it.
    hidden_dim: Optional[int] = None
    head_dim: int = field(init=False)

    def __post_init__(self):
        # Every size type- and range-checked (ValueError): see formats/config.py.
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * (
                (hidden + self.multiple_of - 1) // self.multiple_of
            )
            check_value("hidden_dim", self.hidden_dim, "the FFN size from dim and multiple_of")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from Meta's params.json or HF's config.json; unknown keys are ignored.
        A bad value is a ``ValueError`` naming the key as the file spells it."""
        keys: dict[str, str] = {}
        if "hidden_size" in params:  # Hugging Face config.json
            check_hf_config(params)
            keys = HF_KEYS
            params = {
                "dim": params["hidden_size"],
                "n_layers": params["num_hidden_layers"],
                "n_heads": params["num_attention_heads"],
                "n_kv_heads": params.get("num_key_value_heads"),
                "vocab_size": params.get("vocab_size", 32000),
                "hidden_dim": params.get("intermediate_size"),
                "norm_eps": params.get("rms_norm_eps", 1e-5),
                "rope_theta": params.get("rope_theta", 10000.0),
                "max_seq_len": params.get("max_position_embeddings", 4096),
            }
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in params.items() if k in names and v is not None}
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        check_fields({**defaults, **kwargs}, keys)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` for these sizes (what mlx-lm also reads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


# Table 1 / params.json of the released checkpoints (chat variants share the sizes).
PRESETS: dict[str, ModelArgs] = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70B": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3,
    ),
}
for _size in ("7B", "13B", "70B"):
    PRESETS[f"{_size}-chat"] = PRESETS[_size]


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in float32 and cast back (as Meta's reference)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rope(x: mx.array, theta: float, offset: int | mx.array = 0) -> mx.array:
    """Rotary embedding of (B, H, T, head_dim) at positions offset..offset+T-1.

    Rotate-half form: the q/k rows are stored permuted so that this equals
    Meta's interleaved (complex-number) rotation.
    """
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=theta, scale=1.0, offset=offset)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta = args.rope_theta
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, T, H*hd) -> (B, H, T, hd); k and v keep only the n_kv_heads (GQA).
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = rope(q, self.rope_theta, offset), rope(k, self.rope_theta, offset)
        if cache is None:
            # The fused kernel shares each KV head among n_heads // n_kv_heads query heads.
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:  # the cache stores k, v and attends over all its keys (BaseKVCache.attend)
            out = cache.attend(q, k, v, self.scale, mask)
        # (B, H, T, hd) -> (B, T, H*hd)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # One fused elementwise kernel instead of three (silu, then the product).
    return nn.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def _checkpointed(layer: nn.Module, h: mx.array, mask) -> mx.array:
    # mx.checkpoint only differentiates its explicit inputs: pass the block's trainable
    # parameters in (captured ones would get zero gradients).
    def run(params, h):
        layer.update(params)
        return layer(h, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h)


class LlamaModel(nn.Module):
    """Embedding, the blocks and the final norm: tokens (B, T) -> hidden states (B, T, dim)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Set by gradient checkpointing (trainer): recompute each block in backward.
        self.checkpoint_blocks = False

    def __call__(self, tokens: mx.array, cache=None, mask=None) -> mx.array:
        h = self.embed_tokens(tokens)
        T = h.shape[1]
        if mask is None:
            if cache is not None and cache[0] is not None:
                mask = cache[0].make_mask(T)
            elif T > 1:
                mask = "causal"
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            if self.checkpoint_blocks and c is None:
                h = _checkpointed(layer, h, mask)
            else:
                h = layer(h, mask, c)
        return self.norm(h)


class Transformer(nn.Module):
    """The Llama 2 language model: tokens (B, T) -> logits (B, T, vocab).

    ``cache`` is a list with one KV cache per layer (see ``llama2_mlx.models.cache``);
    ``mask`` overrides the causal mask (e.g. block-diagonal for packed rows).
    The same call serves training (no cache) and decoding (with a cache).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, tokens: mx.array, cache=None, mask=None) -> mx.array:
        return self.lm_head(self.model(tokens, cache=cache, mask=mask))


def num_params(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the ``with`` block with ``model`` in eval mode (dropout off), then give it back
    the mode it had, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
