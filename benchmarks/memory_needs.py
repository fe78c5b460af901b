"""Memory needs of the Llama 2 sizes: weights in bf16 and 4-bit, KV cache per token.

Counts parameters from the presets (no weights are built) and prints a markdown
table. 4-bit is MLX's affine quantization with group size 64: 4 bits per weight
plus a bf16 scale and bias per group (4.5 bits), applied to every linear layer and
the embedding, as `llama2 convert -q` does; norms stay bf16.
"""

from __future__ import annotations

from llama2_mlx.models.model import PRESETS, ModelArgs


def param_counts(a: ModelArgs) -> tuple[int, int]:
    """(quantizable matrix parameters, norm parameters)."""
    attn = a.dim * a.n_heads * a.head_dim * 2 + a.dim * a.n_kv_heads * a.head_dim * 2
    ffn = 3 * a.dim * a.hidden_dim
    matrices = a.n_layers * (attn + ffn) + 2 * a.vocab_size * a.dim
    norms = (2 * a.n_layers + 1) * a.dim
    return matrices, norms


def kv_bytes_per_token(a: ModelArgs, n_kv_heads: int, itemsize: int = 2) -> int:
    return 2 * a.n_layers * n_kv_heads * a.head_dim * itemsize


def main() -> None:
    gib = 2**30
    print("| model | params | bf16 weights | 4-bit weights | KV/token bf16 | KV/token without GQA "
          "| KV at 4096 tokens |")
    print("|---|---|---|---|---|---|---|")
    for name in ("7B", "13B", "70B"):
        a = PRESETS[name]
        mats, norms = param_counts(a)
        bf16 = 2 * (mats + norms)
        q4 = mats * 4.5 / 8 + 2 * norms
        kv, kv_mha = kv_bytes_per_token(a, a.n_kv_heads), kv_bytes_per_token(a, a.n_heads)
        print(f"| {name} | {(mats + norms) / 1e9:.2f} B | {bf16 / gib:.1f} GiB | {q4 / gib:.1f} GiB "
              f"| {kv / 2**10:.0f} KiB | {kv_mha / 2**10:.0f} KiB | {4096 * kv / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
