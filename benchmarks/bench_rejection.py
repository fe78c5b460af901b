"""Best-of-K rejection sampling vs K separate generations of the same prompt.

A Llama-2-shaped random-weight policy; the reward model shares its backbone
(the timing is what matters). Three ways to get K answers to one prompt:

* ``separate``: K calls of ``sample_k(k=1)`` - K prefills, K batch-1 decodes;
* ``best-of-K``: one ``sample_k(k=K)`` - one prefill, its KV cache repeated K
  times, the K answers decoded as one batch;
* ``best-of-K + scoring``: the same plus the reward model on the K sequences,
  the shared prompt run once there too (``score_shared_prefix``): what
  ``rejection_sample`` does per prompt;
* ``separate + scoring``: K separate generations, each scored on its own.

Sampling at temperature 1; rows stop at EOS, so the generated token counts are
reported (random weights rarely hit EOS). Best of ``--repeats`` interleaved runs.

    python benchmarks/bench_rejection.py [--dim 256 --layers 4 --prompt-tokens 128 --gen-tokens 32 -k 8]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from llama2_mlx.generate import GenerationConfig, sample_k
from llama2_mlx.model import ModelArgs, Transformer, num_params
from llama2_mlx.reward import RewardModel, score_sequences, score_shared_prefix


def build(args):
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, hidden_dim=args.hidden, vocab_size=args.vocab)
    mx.random.seed(0)
    policy = Transformer(margs)
    policy.set_dtype(getattr(mx, args.dtype))
    rm = RewardModel.from_policy(policy)
    mx.eval(policy.parameters(), rm.parameters())
    return policy, rm


def timed(fn):
    mx.synchronize()
    tic = time.perf_counter()
    out = fn()
    mx.synchronize()
    return time.perf_counter() - tic, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    policy, rm = build(args)
    prompt = np.random.RandomState(0).randint(3, args.vocab, args.prompt_tokens).tolist()
    config = GenerationConfig(max_tokens=args.gen_tokens, temp=1.0)
    K, eos = args.k, 2

    def separate():
        return [sample_k(policy, prompt, 1, config, eos).tokens[0] for _ in range(K)]

    def best_of_k():
        return sample_k(policy, prompt, K, config, eos).tokens

    def best_of_k_scored():
        outs = sample_k(policy, prompt, K, config, eos).tokens
        rewards = score_shared_prefix(rm, [prompt + o + [eos] for o in outs])
        return outs, int(np.argmax(rewards))

    def separate_scored():
        outs = [sample_k(policy, prompt, 1, config, eos).tokens[0] for _ in range(K)]
        rewards = [score_sequences(rm, [prompt + o + [eos]])[0] for o in outs]
        return outs, int(np.argmax(rewards))

    runs = {"separate": separate, "best-of-K": best_of_k, "best-of-K + scoring": best_of_k_scored,
            "separate + scoring": separate_scored}
    best = {name: float("inf") for name in runs}
    tokens = {}
    separate()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            dt, out = timed(fn)
            best[name] = min(best[name], dt)
            outs = out[0] if isinstance(out, tuple) else out
            tokens[name] = sum(len(o) for o in outs)

    print(f"model: {num_params(policy) / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, {args.dtype}), device {mx.default_device()}; "
          f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} new tokens, K = {K}")
    print()
    print(f"| way | seconds | generated tokens | time vs {K} separate |")
    print("|---|---|---|---|")
    for name in runs:
        label = name.replace("K", str(K))
        print(f"| {label} | {best[name]:.3f} | {tokens[name]} | {best[name] / best['separate']:.3f} |")


if __name__ == "__main__":
    main()
