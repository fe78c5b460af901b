"""Distributed runs on this machine: LoRA training tokens/s on 1 and 2 processes (data
parallel, ``mlx.launch -n 2 --backend ring`` on localhost), and per-rank peak memory and
decode speed of tensor-parallel generation against one process.

Random-weight Llama-2-shaped models are saved with ``save_model`` (with the bundled demo
tokenizer); both runs go through the command line (``python -m cli.app``), the 2-process
ones under ``mlx.launch``. Training speed is the trainer's own tokens/s (non-padding
tokens of the global batches over the steps' time; validation off). A markdown table
goes to stdout.

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --dim 512 --layers 8 --tp-dim 1536 --tp-layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama2_mlx import blas  # noqa: E402  (first: the BLAS is chosen before mlx loads)

import mlx.core as mx  # noqa: E402

from llama2_mlx.checkpoints.export import save_model  # noqa: E402
from llama2_mlx.models.model import ModelArgs, Transformer, num_params  # noqa: E402

TOKENIZER = ROOT / "llama2_mlx" / "demo" / "assets" / "tokenizer.model"
CLI = [sys.executable, "-m", "cli.app"]
WORDS = ("the quick brown fox jumps over the lazy dog llama model answer question one two "
         "three four five six seven eight nine ten hello world paris rome").split()

TP_SCRIPT = """
import json, sys, time
import llama2_mlx
import mlx.core as mx
from mlx.utils import tree_flatten
from llama2_mlx.io.distributed import start
from llama2_mlx.generation.generate import GenerationConfig, stream_generate

w = start()
if w.size > 1:
    from llama2_mlx.generation.parallel import load_for_generation
    model, tok = load_for_generation(sys.argv[1], w)
else:
    from llama2_mlx.checkpoints.load import load
    model, tok = load(sys.argv[1])
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
ids = tok.encode("hello world the quick brown fox jumps over the lazy dog", bos=True)
for r in stream_generate(model, tok, ids, GenerationConfig(max_tokens=int(sys.argv[2]))):
    pass
out = {"rank": w.rank, "weights_gb": weights / 1e9, "peak_gb": mx.get_peak_memory() / 1e9,
       "decode_tps": r.generation_tps, "kv_bytes": r.kv_cache_bytes}
open(f"tp-result-{w.size}-{w.rank}.json", "w").write(json.dumps(out))  # rank > 0 prints nothing
"""


def free_port(n: int = 2) -> int:
    for _ in range(100):
        port = random.randint(20000, 60000)
        try:
            socks = []
            for p in range(port, port + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            for s in socks:
                s.close()
            return port
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


LAUNCHER = "direct"  # or "mlx.launch" (--launcher)


def launch(n: int, command: list[str], cwd: Path, timeout: float = 3600,
           split_threads: bool = False) -> str:
    """Run ``command`` as n ranks (ring on localhost); rank 0's output. ``direct`` starts
    the ranks as mlx.launch does (MLX_RANK, MLX_HOSTFILE) without the launcher, whose
    I/O loop busy-waits (about 60-75% of a core in MLX 0.32) and would slow the ranks on a
    small machine."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if split_threads:  # the cores shared out: each process's BLAS gets cores / n threads
        env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    if n > 1 and LAUNCHER == "direct":
        port = free_port(n)
        hostfile = cwd / f"hosts-{port}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
        procs = [subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)))
                 for r in range(n)]
        try:
            outs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise SystemExit(f"failed: {' '.join(command)}\n" + "\n".join(outs))
        return outs[0]
    if n > 1:
        command = ["mlx.launch", "-n", str(n), "--backend", "ring", "-p", str(free_port(n)),
                   "--", *command]
    p = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.PIPE)
    if p.returncode != 0 or "error:" in p.stderr:
        raise SystemExit(f"failed: {' '.join(command)}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def save_random_model(folder: Path, dim: int, layers: int, heads: int, kv_heads: int,
                      vocab: int, dtype) -> int:
    mx.random.seed(0)
    model = Transformer(ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                                  vocab_size=vocab, multiple_of=64, max_seq_len=4096))
    model.set_dtype(dtype)
    save_model(model, folder, TOKENIZER)
    return num_params(model)


def write_data(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=rng.randint(20, 80))),
                                "completion": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))})
                    + "\n")


def bench_train(args, tmp: Path) -> list[dict]:
    model = tmp / "train-model"
    n = save_random_model(model, args.dim, args.layers, args.heads, args.heads, args.vocab,
                          mx.float32)
    write_data(tmp / "data", args.samples)
    rows = []
    for procs in (1, 2):
        cmd = [*CLI, "lora-train", "--model", str(model), "--data", str(tmp / "data"),
               "--adapter-path", str(tmp / f"ad{procs}"), "--iters", str(args.iters),
               "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length),
               "--val-every", "0", "--save-every", "0", "--rank", "8", "--long-samples", "truncate"]
        out = launch(procs, cmd, tmp, split_threads=args.split_threads)
        m = re.search(r"trained (\d+) steps in ([\d.]+)s, ([\d,]+) tokens/s", out)
        rows.append({"procs": procs, "params": n, "steps": int(m.group(1)),
                     "seconds": float(m.group(2)), "tps": float(m.group(3).replace(",", ""))})
    return rows


def bench_tp(args, tmp: Path) -> list[dict]:
    model = tmp / "tp-model"
    n = save_random_model(model, args.tp_dim, args.tp_layers, args.tp_heads, args.tp_heads // 2,
                          args.vocab, mx.bfloat16)
    script = tmp / "tp.py"
    script.write_text(TP_SCRIPT)
    rows = []
    for procs in (1, 2):
        launch(procs, [sys.executable, str(script), str(model), str(args.tokens)], tmp)
        for rank in range(procs):
            result = json.loads((tmp / f"tp-result-{procs}-{rank}.json").read_text())
            rows.append({"procs": procs, "params": n, **result})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--tp-dim", type=int, default=1024)
    ap.add_argument("--tp-layers", type=int, default=8)
    ap.add_argument("--tp-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--split-threads", action="store_true",
                    help="give each of N processes cores/N BLAS threads (OPENBLAS_NUM_THREADS)")
    ap.add_argument("--skip-tp", action="store_true", help="training only")
    ap.add_argument("--launcher", choices=["direct", "mlx.launch"], default="direct",
                    help="start the ranks directly (default) or with mlx.launch")
    args = ap.parse_args()
    global LAUNCHER
    LAUNCHER = args.launcher
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# distributed on {os.cpu_count()} CPU cores (load average {load}); "
          f"BLAS: {blas.describe().name}; ranks started by {args.launcher}\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = bench_train(args, tmp)
        print(f"## LoRA training ({train[0]['params'] / 1e6:.1f}M params, float32, global batch "
              f"{args.batch_size} rows of <= {args.max_seq_length}, {args.iters} steps"
              + (", BLAS threads split between the processes" if args.split_threads else "")
              + ")\n")
        print("| processes | tokens/s | seconds | speed-up | scaling efficiency |")
        print("|---|---|---|---|---|")
        for r in train:
            up = r["tps"] / train[0]["tps"]
            print(f"| {r['procs']} | {r['tps']:,.0f} | {r['seconds']:.1f} | {up:.2f}x | "
                  f"{up / r['procs']:.0%} |")
        if args.skip_tp:
            return
        tp = bench_tp(args, tmp)
        print(f"\n## Tensor-parallel generation ({tp[0]['params'] / 1e6:.1f}M params, bfloat16, "
              f"{args.tokens} tokens)\n")
        print("| processes | rank | weights GB | peak GB | KV cache bytes | decode tok/s |")
        print("|---|---|---|---|---|---|")
        for r in sorted(tp, key=lambda r: (r["procs"], r["rank"])):
            print(f"| {r['procs']} | {r['rank']} | {r['weights_gb']:.3f} | {r['peak_gb']:.3f} | "
                  f"{r['kv_bytes']:,} | {r['decode_tps']:.1f} |")


if __name__ == "__main__":
    main()
