"""Serving throughput: ``llama2 serve`` vs ``mlx_lm.server`` on the same weights.

Both servers run as subprocesses on free 127.0.0.1 ports and get the same greedy
``/v1/completions`` requests (distinct prompts) from 1, 4 and 8 concurrent clients.
We report requests/s, sampled tokens/s (``usage.completion_tokens``; mlx-lm counts the
EOS token, we do not, so one is added to ours when an answer ended at EOS) and tokens
per CPU-second of the server process (less sensitive to other load on a shared
machine), and the ratio ours / mlx-lm. Each level runs ``--repeats`` times, the two
servers taking turns; the table has the best run (the least disturbed by other load)
and, in parentheses, the median.

Models: ``demo`` (the bundled chat model, short answers to its toy questions) and
``random`` (a random-weight Llama 2 of ``--dim``/``--layers`` with the demo tokenizer,
which rarely says EOS: every request generates about ``--max-tokens`` tokens).

    python benchmarks/bench_serve.py [--model demo|random|PATH] [--clients 1,4,8]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "ours":
        cmd = [sys.executable, "-m", "cli.app", "serve", "--model", model, "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port),
               "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                           "temperature": 0}, timeout=30)
            if r.status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{kind} server did not start")


def requests_for(model_kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if model_kind == "demo":
        from llama2_mlx.demo import EXAMPLES

        qs = [q for q, _ in EXAMPLES] + [f"What is {a} plus {b}?" for a, b in
                                         ((rng.randrange(100), rng.randrange(100)) for _ in range(n))]
        return [f"[INST] {qs[i % len(qs)]} [/INST]" for i in range(n)]
    words = "the quick brown fox jumps over the lazy dog one two three four five".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(16, 48))) + f" {i}"
            for i in range(n)]


def run_level(url: str, pid: int, prompts: list[str], clients: int, max_tokens: int,
              eos_uncounted: bool) -> dict:
    client = httpx.Client(timeout=600)

    def one(prompt: str) -> int:
        r = client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0})
        r.raise_for_status()
        out = r.json()
        eos = eos_uncounted and out["choices"][0]["finish_reason"] == "stop"  # no stop strings
        return out["usage"]["completion_tokens"] + eos

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, prompts))
    dt, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    client.close()
    return {"req/s": len(prompts) / dt, "tok/s": tokens / dt, "tok/cpu-s": tokens / max(cpu, 1e-9),
            "tokens": tokens}


def random_model(args, out: Path) -> str:
    import mlx.core as mx

    from llama2_mlx.checkpoints.export import save_model
    from llama2_mlx.demo import default_model_path
    from llama2_mlx.models.model import ModelArgs, Transformer, num_params

    mx.random.seed(0)
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, vocab_size=1024, max_seq_len=2048)
    model = Transformer(margs)
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    print(f"random model: {num_params(model) / 1e6:.1f}M parameters, {args.dtype}", flush=True)
    return str(save_model(model, out, default_model_path() / "tokenizer.model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="demo, random, or a model folder")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests-per-client", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="float32", help="of the random model")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory()
    if args.model == "demo":
        from llama2_mlx.demo import default_model_path

        path, kind = str(default_model_path()), "demo"
    elif args.model == "random":
        path, kind = random_model(args, Path(tmp.name) / "model"), "random"
    else:
        path, kind = args.model, "random"
    servers, procs = {}, []
    try:
        for name in ("ours", "mlx-lm"):
            port = free_port()
            procs.append(start(name, path, port))
            servers[name] = (f"http://127.0.0.1:{port}", procs[-1].pid)
            run_level(servers[name][0], procs[-1].pid, requests_for(kind, 8, seed=99), 4,
                      args.max_tokens, name == "ours")  # warm-up
        runs = {}
        for rep in range(args.repeats):  # interleaved, so both see the same machine load
            for c in levels:
                prompts = requests_for(kind, c * args.requests_per_client, seed=100 * rep + c)
                for name in (("ours", "mlx-lm") if rep % 2 == 0 else ("mlx-lm", "ours")):
                    r = run_level(*servers[name], prompts, c, args.max_tokens, name == "ours")
                    runs.setdefault((name, c), []).append(r)
                    print(f"{name:7s} clients={c} repeat {rep}: {r['req/s']:.2f} req/s, "
                          f"{r['tok/s']:.1f} tok/s, {r['tok/cpu-s']:.1f} tok/cpu-s "
                          f"({r['tokens']} tokens)", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    # The best run of each (the least disturbed by other load), and the medians.
    best = {key: {m: max(r[m] for r in rs) for m in ("req/s", "tok/s")} for key, rs in runs.items()}
    median = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
              for key, rs in runs.items()}
    print(f"\nmodel: {args.model}, max_tokens {args.max_tokens}, "
          f"{args.requests_per_client} requests per client, greedy, {args.repeats} repeats; "
          "best (median)\n")
    print("| clients | ours req/s | mlx-lm req/s | ratio | ours tok/s | mlx-lm tok/s | ratio "
          "| tok/cpu-s ours / mlx-lm (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        row = [f"{c}"]
        for key in ("req/s", "tok/s"):
            a, b = best["ours", c][key], best["mlx-lm", c][key]
            am, bm = median["ours", c][key], median["mlx-lm", c][key]
            row += [f"{a:.1f} ({am:.1f})", f"{b:.1f} ({bm:.1f})", f"{a / b:.2f}x ({am / bm:.2f}x)"]
        a, b = median["ours", c]["tok/cpu-s"], median["mlx-lm", c]["tok/cpu-s"]
        row.append(f"{a:.0f} / {b:.0f} = {a / b:.2f}x")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
