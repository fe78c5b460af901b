"""Speculative decoding: decode speed of plain, prompt-lookup and draft-model decoding,
ours and mlx-lm's, side by side (one run, greedy, a table per BLAS).

The models. The drafter is the bundled demo model (1M parameters, trained on six toy
chat tasks), in float32. The target (~100M parameters, float32) is the demo model
widened: dim 128 -> 768 (heads 4 -> 24, KV heads 2 -> 12, head dim 32 kept), FFN
352 -> 2048, 4 -> 16 layers. The widening preserves the function: the new input-side
weights are random, every weight that writes into the residual stream from a new unit
(new heads' o_proj columns, new FFN units' down_proj columns, the 12 new layers' o_proj
and down_proj, new residual dimensions) is zero, and the norm weights are scaled by
sqrt(128 / 768) (an RMS over 768 dimensions of which 128 are non-zero). Then those
writing weights get Gaussian noise of std ``--noise``, so the target is a *different*
model that agrees with its drafter often but not always (see the acceptance rates).
mlx-lm's ``llama`` model gets the very same arrays (``bench_generate.mlx_lm_twin``).

The prompts (demo chat format). Input-grounded: a dialog whose earlier turns already
hold the answer (the question is asked again, or a spelling is asked again in another
turn): what prompt lookup is for. Free-form: single questions with no history. Each
answer runs until EOS or ``--max-tokens``. Decode tok/s = (tokens - 1) / (time after the
first token), summed over the prompts of a set; acceptance = accepted / drafted.

Each BLAS config runs in its own subprocess (``LLAMA2_MLX_BLAS=off``: the reference
BLAS bundled with mlx; unset: OpenBLAS, loaded by llama2_mlx/blas.py).

    python benchmarks/bench_speculative.py [--noise 0.02 --num-draft-tokens 6 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = "--worker"
ROOT = Path(__file__).resolve().parents[1]


def widened(demo, dim=768, heads=24, kv_heads=12, hidden=2048, layers=16, noise=0.02, seed=0):
    """The demo model widened as the module docstring says (a new ``Transformer``)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from llama2_mlx.models.model import ModelArgs, Transformer

    a = demo.args
    if a.head_dim != dim // heads or heads // kv_heads != a.n_heads // a.n_kv_heads:
        raise ValueError("keep the head dim and the GQA group size")
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                     hidden_dim=hidden, vocab_size=a.vocab_size, norm_eps=a.norm_eps,
                     rope_theta=a.rope_theta, max_seq_len=a.max_seq_len)
    mx.random.seed(seed)
    old = dict(tree_flatten(demo.parameters()))
    new = {}
    scale = math.sqrt(a.dim / dim)
    writes = ("o_proj", "down_proj")  # into the residual stream
    for name, w in tree_flatten(Transformer(args).parameters()):
        if name.endswith("norm.weight"):
            w = mx.full(w.shape, scale)
        elif any(k in name for k in writes) or name.endswith("embed_tokens.weight"):
            w = noise * mx.random.normal(w.shape)
        else:
            w = 0.02 * mx.random.normal(w.shape)
        if name in old:  # the demo's block, top-left
            o = old[name].astype(mx.float32)
            if name.endswith("norm.weight"):
                o = o * scale
            idx = tuple(slice(0, s) for s in o.shape)
            w[idx] = o
        new[name] = w
    model = Transformer(args)
    model.update(tree_unflatten(list(new.items())))
    mx.eval(model.parameters())
    return model


def prompts(tok, answer):
    """(input-grounded, free-form) prompt ids in the demo's chat format; ``answer(ids)``
    is the target's own (plain, greedy) answer, as token ids: the history holds those
    very tokens (the demo's answers do not always re-encode to the tokens it sampled)."""
    from llama2_mlx.demo.tasks import universe

    def turn(q):
        return tok.encode_chat([{"role": "user", "content": q}])  # <s>[INST] q [/INST]

    words = sorted(universe().words["train"], key=lambda w: (-len(w), w))[:8]
    asked = [f"Spell the word {w}." for w in words] + [
        f"Spell the word {w} backwards." for w in words]
    free = [turn(q) for q in asked]
    answers = [answer(ids) for ids in free]
    grounded = []
    for i, q in enumerate(asked):  # asked again, two turns later
        j = (i + 3) % len(asked)
        grounded.append(free[i] + answers[i] + [tok.eos_id] + free[j] + answers[j]
                        + [tok.eos_id] + turn(q))
    return {"input-grounded": grounded, "free-form": free}


def run(steps, eos, max_tokens):
    """(tokens, seconds after the first token) of one generation."""
    tic = time.perf_counter()
    out, t_first = [], tic
    for t in steps:
        t = int(t)
        if not out:
            t_first = time.perf_counter()
        if t == eos:
            break
        out.append(t)
        if len(out) == max_tokens:
            break
    return out, time.perf_counter() - t_first


def worker(args) -> None:
    from llama2_mlx import blas  # first: the BLAS is chosen before mlx loads

    import mlx.core as mx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_generate import mlx_lm_twin
    from mlx_lm.generate import generate_step as lm_plain
    from mlx_lm.generate import speculative_generate_step as lm_spec

    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.demo import ASSETS as DEMO_DIR
    from llama2_mlx.generation.generate import generate_step
    from llama2_mlx.generation.speculative import (
        DraftStats,
        ModelDrafter,
        PromptLookupDrafter,
        speculative_generate_step,
    )
    from llama2_mlx.models.model import num_params

    draft, tok = load(DEMO_DIR, dtype="float32")
    target = widened(draft, noise=args.noise)
    lm_target, lm_draft = mlx_lm_twin(target), mlx_lm_twin(draft)
    K, M = args.num_draft_tokens, args.max_tokens
    stats = DraftStats()

    def ours_spec(drafter):
        return lambda p: (t.item() for t, _ in speculative_generate_step(
            target, mx.array(p), drafter(), max_tokens=M, num_draft_tokens=K, stats=stats))

    engines = {
        "ours plain": lambda p: (t.item() for t, _ in generate_step(target, mx.array(p),
                                                                     max_tokens=M)),
        f"ours prompt-lookup {args.ngram}": ours_spec(lambda: PromptLookupDrafter(args.ngram)),
        "ours draft model": ours_spec(lambda: ModelDrafter(draft)),
        "mlx-lm plain": lambda p: (int(t) for t, _ in lm_plain(mx.array(p), lm_target,
                                                                  max_tokens=M)),
        "mlx-lm draft model": lambda p: (int(t) for t, _, _ in lm_spec(
            mx.array(p), lm_target, lm_draft, num_draft_tokens=K, max_tokens=M)),
    }
    def answer(ids):
        return run((t.item() for t, _ in generate_step(target, mx.array(ids), max_tokens=M)),
                   tok.eos_id, M)[0]

    sets = prompts(tok, answer)
    for steps in engines.values():  # warm-up
        run(steps(sets["free-form"][0]), tok.eos_id, 4)
    results, outputs = {}, {}
    for set_name, ps in sets.items():
        acc = {name: dict(n=0, secs=0.0, drafted=0, accepted=0, outs=[]) for name in engines}
        for i, p in enumerate(ps):  # engines interleaved per prompt: load spikes spread out
            for name in list(engines)[:: 1 if i % 2 == 0 else -1]:
                stats.drafted = stats.accepted = 0
                out, secs = run(engines[name](p), tok.eos_id, M)
                a = acc[name]
                a["n"], a["secs"] = a["n"] + len(out) - 1, a["secs"] + secs
                a["drafted"], a["accepted"] = a["drafted"] + stats.drafted, a["accepted"] + stats.accepted
                a["outs"].append(out)
        for name, a in acc.items():
            rate = a["accepted"] / a["drafted"] if "ours" in name and a["drafted"] else None
            results[(set_name, name)] = (a["n"] / a["secs"] if a["secs"] else 0.0, rate,
                                         a["n"] + len(ps), a["drafted"] if "ours" in name else None)
            outputs[(set_name, name)] = a["outs"]
    same = {s: all(outputs[(s, e)] == outputs[(s, "ours plain")] for e in engines) for s in sets}
    print(json.dumps({"blas": str(blas.describe()), "params": num_params(target),
                      "draft_params": num_params(draft), "same": same,
                      "results": [[s, e, *v] for (s, e), v in results.items()]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, default=0.02,
                   help="std of the noise on the widened target's residual writes")
    p.add_argument("--num-draft-tokens", type=int, default=6)
    p.add_argument("--ngram", type=int, default=8, help="prompt lookup's n-gram size")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--only", choices=["reference", "openblas"], help="run one BLAS config")
    p.add_argument(WORKER, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    argv = [a for a in sys.argv[1:] if a != WORKER]
    configs = {"reference BLAS (LLAMA2_MLX_BLAS=off)": {**os.environ, "LLAMA2_MLX_BLAS": "off"},
               "OpenBLAS": {k: v for k, v in os.environ.items() if k != "LLAMA2_MLX_BLAS"}}
    if args.only:
        configs = {k: v for k, v in configs.items() if args.only in k.lower()}
    for label, env in configs.items():
        out = subprocess.run([sys.executable, __file__, WORKER, *argv], env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"\n### {label}: {r['blas']}\n")
        print(f"target {r['params'] / 1e6:.1f}M params float32, drafter {r['draft_params'] / 1e6:.1f}M; "
              f"greedy, max {args.max_tokens} tokens, K={args.num_draft_tokens}, noise {args.noise}; "
              f"same tokens as ours plain: {r['same']}\n")
        print("| set | engine | tokens | decode tok/s | vs mlx-lm plain | drafted | acceptance |")
        print("|---|---|---|---|---|---|---|")
        base = {s: tps for s, e, tps, _, _, _ in r["results"] if e == "mlx-lm plain"}
        for s, e, tps, acc, n, drafted in r["results"]:
            a = "" if acc is None else f"{100 * acc:.0f}%"
            d = "" if drafted is None else str(drafted)
            print(f"| {s} | {e} | {n} | {tps:.1f} | {tps / base[s]:.2f}x | {d} | {a} |")


if __name__ == "__main__":
    main()
