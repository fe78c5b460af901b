"""MLX on the CPU with its bundled reference BLAS vs the default (OpenBLAS when installed).

Runs this script twice as a subprocess, once with ``LLAMA2_MLX_BLAS=off`` and
once with the caller's environment (by default: the OpenBLAS that
``llama2_mlx.blas`` finds), because the BLAS can only be chosen before mlx is
imported. Each run measures a 1024x1024 float32 matmul (GFLOP/s, median of
``--matmul-repeats``) and greedy generation with ``bench_generate.py``'s model
(prompt and decode tok/s, median of ``--repeats``; every option of
``bench_generate.py`` is passed on). Prints a table side by side and whether
the greedy tokens are identical.

    python benchmarks/bench_blas.py [--repeats 3 --prompt-tokens 128 ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = "--worker"


def matmul_gflops(mx, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n float32 matmul on the default device (median of ``repeats``)."""
    mx.random.seed(0)
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def worker(argv: list[str]) -> None:
    """One measurement in this process, with whatever BLAS setup() picks; a JSON line to stdout."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from llama2_mlx import blas  # first: the BLAS is chosen before mlx loads

    import bench_generate as bg
    import mlx.core as mx
    import numpy as np

    args = bg.parse_args(argv)
    info = blas.describe()
    print(f"  {info}", file=sys.stderr, flush=True)
    gflops = matmul_gflops(mx)
    ours, _ = bg.build_models(args)
    prompt = mx.array(np.random.RandomState(0).randint(3, args.vocab, args.prompt_tokens))
    bg.run_once(bg.ours_steps, ours, prompt[:16], 4)  # warm-up (kernels, allocator)
    runs = [bg.run_once(bg.ours_steps, ours, prompt, args.gen_tokens) for _ in range(args.repeats)]
    print(json.dumps({
        "blas": str(info), "name": info.name, "verified": info.verified, "gflops": gflops,
        "prompt tok/s": float(np.median([r["prompt tok/s"] for r in runs])),
        "decode tok/s": float(np.median([r["decode tok/s"] for r in runs])),
        "tokens": [int(t) for t in runs[0]["tokens"]],
        "same tokens every run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
    }))


def measure(label: str, env: dict, argv: list[str]) -> dict:
    print(f"running {label} ...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, WORKER, *argv], env=env, stdout=subprocess.PIPE,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == [WORKER]:
        return worker(argv[1:])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_generate as bg

    args = bg.parse_args(argv)  # validates the options (and --help) before the runs
    default_env = dict(os.environ)
    if default_env.get("LLAMA2_MLX_BLAS", "").strip().lower() in ("off", "0", "none"):
        del default_env["LLAMA2_MLX_BLAS"]  # the second run is the default search, not off again
    runs = {
        "reference (LLAMA2_MLX_BLAS=off)": measure("reference", {**os.environ, "LLAMA2_MLX_BLAS": "off"}, argv),
        "default": measure("default", default_env, argv),
    }
    (ref_label, ref), (_, new) = runs.items()
    short = new["name"]
    if short.startswith("OpenBLAS"):
        short = " ".join(short.split()[:2])  # "OpenBLAS 0.3.21", without the build flags
    print(f"model: bench_generate.py's, dim {args.dim}, {args.layers} layers, {args.dtype}; prompt "
          f"{args.prompt_tokens}, generate {args.gen_tokens}, median of {args.repeats}")
    for label, r in runs.items():
        print(f"BLAS, {label}: {r['blas']}")
    print(f"\n| metric (median) | {ref_label} | default: {short} | default / reference |")
    print("|---|---|---|---|")
    for key, title in (("gflops", "1024x1024 fp32 matmul GFLOP/s"), ("prompt tok/s", "prompt tok/s"),
                       ("decode tok/s", "decode tok/s")):
        print(f"| {title} | {ref[key]:.1f} | {new[key]:.1f} | {new[key] / ref[key]:.2f}x |")
    print(f"\nsame greedy tokens: {ref['tokens'] == new['tokens']} "
          f"(each run stable across repeats: {ref['same tokens every run'] and new['same tokens every run']})")


if __name__ == "__main__":
    main()
