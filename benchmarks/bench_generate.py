"""Generation speed: llama2-mlx vs mlx-lm on the same random-weight model.

One Llama-2-shaped model (~100M parameters, grouped-query attention) with
random weights; mlx-lm's ``llama`` model gets the very same arrays. Both run
greedy ``generate_step`` on the same prompt ids; we report prompt tok/s
(prefill plus the first token), decode tok/s (the tokens after the first)
and peak memory, the median of ``--repeats`` interleaved runs, and the ratio
ours / mlx-lm (for memory: mlx-lm / ours, so >= 1 is good everywhere). The
speeds per CPU-second are less sensitive to other load on a shared machine.

    python benchmarks/bench_generate.py [--prompt-tokens 128 --gen-tokens 32 ...]
"""

from __future__ import annotations

import argparse
import time

from llama2_mlx import blas  # first: the BLAS is chosen before mlx loads (llama2_mlx/blas.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from llama2_mlx.generation.generate import generate_step  # noqa: E402
from llama2_mlx.models.model import ModelArgs, Transformer, num_params  # noqa: E402


def build_models(args):
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, hidden_dim=args.hidden, vocab_size=args.vocab)
    mx.random.seed(0)
    ours = Transformer(margs)
    ours.set_dtype(getattr(mx, args.dtype))
    mx.eval(ours.parameters())
    return ours, mlx_lm_twin(ours)


def mlx_lm_twin(ours):
    """mlx-lm's ``llama`` model holding the very same arrays as our ``Transformer``."""
    from mlx_lm.models import llama

    theirs = llama.Model(llama.ModelArgs.from_dict(ours.args.to_hf_config()))
    theirs.load_weights(list(tree_flatten(ours.parameters())))  # shares the arrays
    mx.eval(theirs.parameters())
    return theirs


def ours_steps(model, prompt, n):
    return (t.item() for t, _ in generate_step(model, prompt, max_tokens=n))


def mlx_lm_steps(model, prompt, n):
    from mlx_lm.generate import generate_step as lm_generate_step

    return (t for t, _ in lm_generate_step(prompt, model, max_tokens=n))


def run_once(steps, model, prompt, n):
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic, cpu0 = time.perf_counter(), time.process_time()
    tokens = []
    for i, t in enumerate(steps(model, prompt, n)):
        tokens.append(t)
        if i == 0:
            t_first, cpu_first = time.perf_counter(), time.process_time()
    t_end, cpu_end = time.perf_counter(), time.process_time()
    return {
        "prompt tok/s": prompt.size / (t_first - tic),
        "decode tok/s": (n - 1) / (t_end - t_first),
        "peak memory GB": mx.get_peak_memory() / 1e9,
        "prompt tok/CPU-s": prompt.size / (cpu_first - cpu0),
        "decode tok/CPU-s": (n - 1) / (cpu_end - cpu_first),
        "tokens": tokens,
    }


def parse_args(argv=None):
    """The model and run options (bench_blas.py passes them on to its runs)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main():
    args = parse_args()

    ours, theirs = build_models(args)
    prompt = mx.array(np.random.RandomState(0).randint(3, args.vocab, args.prompt_tokens))
    print(f"model: {num_params(ours) / 1e6:.1f}M params, dim {args.dim}, {args.layers} layers, "
          f"{args.heads} heads / {args.kv_heads} KV heads, {args.dtype}, "
          f"{mx.default_device()}; prompt {args.prompt_tokens}, generate {args.gen_tokens}, "
          f"median of {args.repeats}")
    print(f"BLAS: {blas.describe()}")

    engines = {"llama2-mlx": (ours_steps, ours), "mlx-lm": (mlx_lm_steps, theirs)}
    for steps, model in engines.values():  # warm-up (kernels, allocator)
        run_once(steps, model, prompt[:16], 4)
    runs = {name: [] for name in engines}
    for i in range(args.repeats):  # interleaved, alternating which goes first
        for name in list(engines)[:: 1 if i % 2 == 0 else -1]:
            steps, model = engines[name]
            runs[name].append(run_once(steps, model, prompt, args.gen_tokens))
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "tokens"}
           for name, rs in runs.items()}
    o, t = med["llama2-mlx"], med["mlx-lm"]
    print("\n| metric (median) | llama2-mlx | mlx-lm | ratio |\n|---|---|---|---|")
    for k in o:
        ratio = t[k] / o[k] if k == "peak memory GB" else o[k] / t[k]  # >= 1: ours is better
        print(f"| {k} | {o[k]:.3f} | {t[k]:.3f} | {ratio:.3f} |")
    same = runs["llama2-mlx"][0]["tokens"] == runs["mlx-lm"][0]["tokens"]
    print(f"\nsame greedy tokens: {same}")

if __name__ == "__main__":
    main()
