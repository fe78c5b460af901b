"""LoRA training speed and peak memory: ours (padded and packed) vs mlx-lm's trainer.

One random-weight Llama-2-shaped model is saved with ``save_model``; mlx-lm
loads that folder with its own loader and trains with ``mlx_lm.tuner.trainer``
(answer-only loss via prompt offsets, as ``mlx_lm lora --mask-prompt``), we load
it with ours. Both get the same samples (a JSONL file of token ids with the
prompt length: varied prompt and answer lengths), the same LoRA settings and
AdamW. ``ours-packed-b1`` packs one row per step (about the tokens of a padded
batch, so its peak memory compares with the padded runs). Useful tokens are the samples' (non-padding) input tokens; speeds are
per epoch; a markdown table goes to stdout.

    python benchmarks/bench_lora.py            # 19.6M params (dim 256, 4 layers, vocab 32000)
    python benchmarks/bench_lora.py --dim 512 --layers 8 --samples 64   # ~58M, slower
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_mlx import blas  # noqa: E402  (first: the BLAS is chosen before mlx loads)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from llama2_mlx.checkpoints.export import save_model  # noqa: E402
from llama2_mlx.checkpoints.load import load_model  # noqa: E402
from llama2_mlx.models.lora import LoRAConfig, apply_lora  # noqa: E402
from llama2_mlx.models.model import ModelArgs, Transformer, num_params  # noqa: E402
from llama2_mlx.training.data import Sample, SFTBatches  # noqa: E402
from llama2_mlx.training.sft import sft_loss  # noqa: E402
from llama2_mlx.training.trainer import TrainConfig, train  # noqa: E402


def make_data(path: Path, n: int, vocab: int, seed: int, prompt: tuple, answer: tuple) -> None:
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p, a = rng.randint(*prompt), rng.randint(*answer)
            ids = [1] + rng.randint(3, vocab, p + a - 1).tolist() + [2]
            f.write(json.dumps({"tokens": ids, "prompt_len": p}) + "\n")


def read_data(path: Path) -> list[tuple[list[int], int]]:
    return [(r["tokens"], r["prompt_len"]) for r in map(json.loads, open(path))]


def bench_ours(model_dir, data, args, pack: bool, batch_size: int) -> dict:
    model = load_model(model_dir)
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=args.rank, scale=20.0, num_layers=-1))
    samples = [Sample(t, [False] * p + [True] * (len(t) - p), f"s{i}") for i, (t, p) in enumerate(data)]
    batches = SFTBatches(samples, batch_size, args.max_seq_length, pack=pack, seed=0)
    stats = batches.stats()
    common = dict(lr=1e-5, weight_decay=0.01, val_every=0, save_every=0, progress=False)
    train(model, sft_loss, batches, TrainConfig(iters=args.warmup, **common))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    train(model, sft_loss, batches, TrainConfig(iters=len(batches), **common))
    secs = time.perf_counter() - tic
    return dict(secs=secs, useful=stats.tokens, slots=stats.slots, steps=len(batches),
                peak=mx.get_peak_memory() / 1e9)


def bench_mlx_lm(model_dir, data, args) -> list[dict]:
    """Two epochs in one ``train`` call: its compiled step retraces for every new padded
    length, so the first epoch pays the compilations and the second runs warm."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches
    from mlx_lm.tuner.trainer import train as mlx_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(Path(model_dir))
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": args.rank, "scale": 20.0, "dropout": 0.0})
    dataset = [(t, p) for t, p in data]  # (tokens, prompt offset): --mask-prompt
    seen = {"useful": 0, "slots": 0}

    def counting(**kw):
        for batch, lengths in iterate_batches(**kw):
            seen["useful"] += int(np.array(lengths)[:, 1].sum()) - len(lengths)  # input positions
            seen["slots"] += batch.shape[0] * (batch.shape[1] - 1)
            yield batch, lengths

    class Reports(TrainingCallback):
        def __init__(self):
            self.train = []

        def on_train_loss_report(self, info):
            self.train.append(dict(info, peak=mx.get_peak_memory() / 1e9))

    steps = len(data) // args.batch_size
    reports = Reports()
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.01)
    targs = TrainingArgs(batch_size=args.batch_size, iters=2 * steps, max_seq_length=args.max_seq_length + 1,
                         steps_per_report=steps, steps_per_eval=10**9, steps_per_save=10**9,
                         adapter_file=str(Path(model_dir) / "mlx_lm_adapters.safetensors"))
    mx.reset_peak_memory()
    mlx_train(model, opt, dataset, None, targs, iterate_batches=counting, training_callback=reports)
    out = []
    for rep in reports.train:  # one report per epoch; each epoch is every batch once
        out.append(dict(secs=steps / rep["iterations_per_second"], useful=seen["useful"] // 2,
                        slots=seen["slots"] // 2, steps=steps, peak=rep["peak"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt", type=int, nargs=2, default=(8, 96), help="prompt length range")
    ap.add_argument("--answer", type=int, nargs=2, default=(4, 64), help="answer length range")
    ap.add_argument("--only", choices=["ours-padded", "ours-packed", "ours-packed-b1", "mlx-lm"], action="append")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                          multiple_of=32, max_seq_len=4096)
        mx.random.seed(0)
        model = Transformer(margs)
        n = num_params(model)
        model_dir = save_model(model, Path(tmp) / "model")
        del model
        make_data(Path(tmp) / "train.jsonl", args.samples, args.vocab, 0, args.prompt, args.answer)
        data = read_data(Path(tmp) / "train.jsonl")
        runs = {}
        for name in args.only or ["mlx-lm", "ours-padded", "ours-packed", "ours-packed-b1"]:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name == "mlx-lm":
                cold, warm = bench_mlx_lm(model_dir, data, args)
                runs["mlx-lm, 1st epoch (compiling)"], runs["mlx-lm"] = cold, warm
            else:
                bs = 1 if name.endswith("-b1") else args.batch_size
                runs[name] = bench_ours(model_dir, data, args, pack=name != "ours-padded", batch_size=bs)
            print(f"  {runs}", file=sys.stderr, flush=True)

    lengths = [len(t) for t, _ in data]
    print(f"\nModel: random Llama-2-shaped, dim {args.dim}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}: {n / 1e6:.1f}M parameters; LoRA rank {args.rank} on all 7 projections "
          f"of every layer; batch {args.batch_size}, max length {args.max_seq_length}.")
    print(f"Data: {len(data)} samples, {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
          "answer-only loss. Ours: one epoch after a 2-step warm-up; mlx-lm: two epochs in one run, "
          "the second (all shapes compiled) is the reference.")
    print(f"BLAS: {blas.describe()}\n")
    print("| run | steps | useful tokens | non-pad share | seconds | useful tok/s | all tok/s | peak GB | vs mlx-lm |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = runs.get("mlx-lm")  # the warm epoch
    for name, r in runs.items():
        tps = r["useful"] / r["secs"]
        ratio = f"{tps / (base['useful'] / base['secs']):.2f}x" if base else "-"
        print(f"| {name} | {r['steps']} | {r['useful']:,} | {r['useful'] / r['slots']:.1%} | {r['secs']:.1f} | "
              f"{tps:,.0f} | {r['slots'] / r['secs']:,.0f} | {r['peak']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
