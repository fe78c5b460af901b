"""Best-of-K rejection sampling vs K separate generations of the same prompt.

A Llama-2-shaped random-weight policy; the reward model shares its backbone
(the timing is what matters). Ways to get K answers to one prompt:

* ``separate``: K calls of ``sample_k(k=1)`` - K prefills, K batch-1 decodes;
* ``best-of-K``: one ``sample_k(k=K)`` - one prefill; the K answers decode as one
  batch over a single copy of the prompt's KV cache (``cache.fork``);
* ``best-of-K, KV repeated``: the same with the prompt's cache copied K times
  (what sample_k did before ``fork``), for the memory column;
* ``+ scoring``: the reward model on the K sequences as well (the shared prompt
  run once there too: ``score_shared_prefix``), what ``rejection_sample`` does per
  prompt; ``separate + scoring`` scores each separate answer on its own.

Sampling at temperature 1; rows stop at EOS, so the generated token counts are
reported (random weights rarely hit EOS). Best of ``--repeats`` interleaved runs.
"extra MB" is the peak memory above the weights during the run.

    python benchmarks/bench_rejection.py [--dim 256 --layers 4 --prompt-tokens 32 128 512 --gen-tokens 32 -k 8]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import mlx.core as mx
import numpy as np

import llama2_mlx.generation.generate as generate
from llama2_mlx.generation.generate import GenerationConfig, sample_k
from llama2_mlx.models.model import ModelArgs, Transformer, num_params
from llama2_mlx.rlhf.reward_model import (
    RewardModel,
    score_sequences,
    score_shared_prefix,
)


def build(args):
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, hidden_dim=args.hidden, vocab_size=args.vocab)
    mx.random.seed(0)
    policy = Transformer(margs)
    policy.set_dtype(getattr(mx, args.dtype))
    rm = RewardModel.from_policy(policy)
    mx.eval(policy.parameters(), rm.parameters())
    return policy, rm


def repeated(cache, k):
    for c in cache:
        c.expand(k)
    return cache


def timed(fn):
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    out = fn()
    mx.synchronize()
    return time.perf_counter() - tic, mx.get_peak_memory() - base, out


def bench(policy, rm, args, prompt_tokens):
    prompt = np.random.RandomState(0).randint(3, args.vocab, prompt_tokens).tolist()
    config = GenerationConfig(max_tokens=args.gen_tokens, temp=1.0)
    K, eos = args.k, 2

    def separate():
        return [sample_k(policy, prompt, 1, config, eos).tokens[0] for _ in range(K)]

    def best_of_k():
        return sample_k(policy, prompt, K, config, eos).tokens

    def best_of_k_repeated():
        with mock.patch.object(generate, "fork", repeated):
            return sample_k(policy, prompt, K, config, eos).tokens

    def best_of_k_scored():
        outs = sample_k(policy, prompt, K, config, eos).tokens
        rewards = score_shared_prefix(rm, [prompt + o + [eos] for o in outs])
        return outs, int(np.argmax(rewards))

    def separate_scored():
        outs = [sample_k(policy, prompt, 1, config, eos).tokens[0] for _ in range(K)]
        rewards = [score_sequences(rm, [prompt + o + [eos]])[0] for o in outs]
        return outs, int(np.argmax(rewards))

    runs = {"separate": separate, "best-of-K": best_of_k,
            "best-of-K, KV repeated": best_of_k_repeated,
            "separate + scoring": separate_scored, "best-of-K + scoring": best_of_k_scored}
    best = {name: (float("inf"), 0) for name in runs}
    tokens = {}
    separate()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            dt, extra, out = timed(fn)
            best[name] = (min(best[name][0], dt), max(best[name][1], extra))
            outs = out[0] if isinstance(out, tuple) else out
            tokens[name] = sum(len(o) for o in outs)
    return best, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    policy, rm = build(args)
    K = args.k
    print(f"model: {num_params(policy) / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, {args.dtype}), device {mx.default_device()}; "
          f"{args.gen_tokens} new tokens, K = {K}")
    print()
    print(f"| prompt tokens | way | seconds | generated tokens | extra MB | time vs {K} separate |")
    print("|---|---|---|---|---|---|")
    for n in args.prompt_tokens:
        best, tokens = bench(policy, rm, args, n)
        for name, (sec, extra) in best.items():
            ref = best["separate + scoring" if "scoring" in name else "separate"][0]
            print(f"| {n} | {name.replace('-K', f'-{K}')} | {sec:.3f} | {tokens[name]} | "
                  f"{extra / 2**20:.1f} | {sec / ref:.3f} |")


if __name__ == "__main__":
    main()
