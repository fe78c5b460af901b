#!/usr/bin/env python
"""Train the bundled demo model from scratch: corpus, tokenizer, model, scores, model card.

    python scripts/train_demo_model.py                 # the shipped model (seed 0)
    python scripts/train_demo_model.py --measure 5     # 5 steps: print tokens/s (no model written)
    python scripts/train_demo_model.py --resume        # continue an interrupted run
    python scripts/train_demo_model.py --card-only     # rewrite MODEL_CARD.md from scores.json

The shipped model took ~33 minutes with the defaults on 2 shared CPU cores (~390 tokens/s).

1. Generates the chat corpus of ``llama2_mlx.demo.tasks`` (seeded) and writes it as
   JSONL to the work folder (train.jsonl; heldout.jsonl holds the evaluation questions).
2. Trains a SentencePiece tokenizer on the training text by Llama 2's recipe
   (``tokenizer.train_tokenizer``: BPE, digits split, byte fallback).
3. Builds a small Llama 2 (GQA) and trains every parameter from scratch with the
   project's trainer (``trainer.train``: AdamW, warmup + cosine to 10%, clipping,
   resumable checkpoints in the work folder), answer-only loss on packed rows.
4. Saves it (bf16) in the Hugging Face layout with ``loader.save_model``, reloads the
   saved folder with ``loader.load`` and scores it on the held-out questions of each
   task (greedy decoding, exact match after strip), then writes MODEL_CARD.md.

Everything is seeded (corpus, tokenizer, BPE-dropout, initialisation, data order): the same
command on the same software and machine repeats the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from llama2_mlx.chat.tokenizer import (
    B_INST,
    E_INST,
    Tokenizer,
    fold_system,
    train_tokenizer,
)
from llama2_mlx.demo import ASSETS
from llama2_mlx.demo import tasks as T
from llama2_mlx.models.model import ModelArgs, Transformer, num_params
from llama2_mlx.training.data import Sample, SFTBatches, tokenize_record
from llama2_mlx.training.sft import sft_loss
from llama2_mlx.training.trainer import StopTraining, TrainConfig, train

# Share of the training examples per task (harder tasks get more).
# BPE-dropout on the words of this share of the word-task prompts (see to_sample).
DROPOUT_SHARE = 0.5
TASK_WEIGHTS = {"add": 3.0, "count": 1.5, "spell": 2.0, "reverse": 2.5, "convert": 1.5,
                "capital": 1.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS, help="model folder to write")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/llama2-demo-work"),
                   help="corpus, tokenizer, checkpoints and scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--multiple-of", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128, help="packed row length in training")
    p.add_argument("--context", type=int, default=256, help="the model's max_seq_len")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=100, help="held-out questions per task")
    p.add_argument("--bpe-dropout", type=float, default=0.3,
                   help="probability of cutting a piece of a word in two, recursively, in "
                        "word-task prompts (a seeded BPE-dropout; 0: off)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--card-only", action="store_true",
                   help="rewrite MODEL_CARD.md from the work folder's scores.json (no training)")
    p.add_argument("--measure", type=int, default=0,
                   help="run this many steps, print tokens/s and exit (writes nothing)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- corpus


def render(record: dict) -> str:
    """The text of a record as the model sees it (for training the tokenizer)."""
    if "raw" in record:
        return " ".join(record["raw"])
    turns = fold_system(record["messages"])
    return " ".join(f"{B_INST} {u['content']} {E_INST} {a['content']}"
                    for u, a in zip(turns[::2], turns[1::2]))


def tokenizer_corpus(records: list[dict]) -> str:
    """The tokenizer's training text: the training dialogs, in which each training word of
    the word list counts once (the words are cut out of the dialogs and listed once).

    In the dialogs every listed word recurs hundreds of times, and BPE would give each
    one its own piece; counted once, they are built from sub-word pieces shared between
    words, as words of real text are. That is what makes spelling learnable for words
    the model never saw: it learns the letters of the pieces, not of whole words.
    """
    lines = [" ".join(w for w in render(r).split(" ") if w.strip(".?:") not in WORD_SET)
             for r in records]
    return "".join(x + "\n" for x in lines + list(T.universe().words["train"]))


def raw_sample(tok: Tokenizer, question: str, answer: str, where: str) -> Sample:
    """BOS question answer EOS, the answer (and EOS) the only targets: a bare prompt."""
    prompt = tok.encode(question, bos=True)
    full = tok.encode(f"{question} {answer}", bos=True, eos=True)
    n = 0
    while n < min(len(prompt), len(full) - 1) and prompt[n] == full[n]:
        n += 1
    return Sample(full, [False] * n + [True] * (len(full) - n), where)


WORD_SET = frozenset(T.WORDS)
WORD_TASKS = ("count", "spell", "reverse")


def split_piece(tok: Tokenizer, piece: str, rng: random.Random, p: float) -> list[str]:
    """With probability ``p``, cut ``piece`` in two pieces of the vocabulary (at a random
    such point) and recurse into both halves: a seeded BPE-dropout of one piece."""
    if len(piece) < 2 or rng.random() >= p:
        return [piece]
    cuts = [i for i in range(1, len(piece))
            if tok.sp.piece_to_id(piece[:i]) != tok.sp.unk_id()
            and tok.sp.piece_to_id(piece[i:]) != tok.sp.unk_id()]
    if not cuts:
        return [piece]
    i = rng.choice(cuts)
    return split_piece(tok, piece[:i], rng, p) + split_piece(tok, piece[i:], rng, p)


def encode_words(tok: Tokenizer, text: str, rng: random.Random, p: float) -> list[int]:
    """``tok.encode(text)`` (no BOS), but the pieces of each word of the word list are
    cut into smaller pieces at random (``split_piece``), as BPE-dropout would.

    Pieces never cross a space, so the encoding is the concatenation of the
    encodings of the space-separated chunks; the caller checks that the
    deterministic version (``p`` = 0) equals ``tok.encode``.
    """
    ids: list[int] = []
    for chunk in text.split(" "):
        chunk_ids = tok.sp.encode(chunk)
        if p > 0 and chunk.strip(".?:") in WORD_SET:
            pieces = [q for i in chunk_ids for q in split_piece(tok, tok.id_to_piece(i), rng, p)]
            chunk_ids = [tok.sp.piece_to_id(q) for q in pieces]
        ids += chunk_ids
    return ids


def to_sample(tok: Tokenizer, record: dict, where: str, rng: Optional[random.Random] = None,
              dropout: float = 0.0) -> Sample:
    """The training sample of a record. With ``rng``, a ``DROPOUT_SHARE`` of the
    word-task samples get BPE-dropout on the words of their prompts (Provilkov et al.
    2020), so the model also learns the letters of the pieces inside words: the
    held-out words are made of those, while most training words are single pieces.
    The answers (the targets) are always encoded as at inference."""
    if "raw" in record:
        return raw_sample(tok, *record["raw"], where)
    sample = tokenize_record({"messages": record["messages"]}, tok, where)
    if rng is None or record.get("task") not in WORD_TASKS or rng.random() >= DROPOUT_SHARE:
        return sample
    turns = fold_system(record["messages"])
    tokens, targets = [], []
    for (ids, is_target), k in zip(tok.chat_segments(record["messages"]),
                                   [j // 2 for j in range(2 * len(turns))]):
        if not is_target:
            text = f"{B_INST} {turns[2 * k]['content'].strip()} {E_INST}"
            if [tok.bos_id] + encode_words(tok, text, rng, 0.0) == ids:
                ids = [tok.bos_id] + encode_words(tok, text, rng, dropout)
        tokens += ids
        targets += [is_target] * len(ids)
    return Sample(tokens, targets, where)


# Tokens of an average training sample (measured with the 1024-piece tokenizer); fixes the
# corpus size from the step count without needing the tokenizer first.
AVG_SAMPLE_TOKENS = 27.5


def examples_needed(steps: int, batch: int, seq_len: int, avg_len: float) -> int:
    return int(steps * batch * seq_len / avg_len * 1.03) + 100


# ----------------------------------------------------------------------------- scoring


def score(model, tok, heldout: dict, *, chat: bool = True, batch: int = 50):
    """Per task: (accuracy, [(question, answer, prediction) of the misses])."""
    from llama2_mlx.generation.generate import (
        GenerationConfig,
        batch_generate,
        prompt_ids,
    )

    config = GenerationConfig(max_tokens=24, temp=0.0)
    out = {}
    for task, examples in heldout.items():
        preds = []
        for i in range(0, len(examples), batch):
            chunk = examples[i : i + batch]
            ids = [prompt_ids(tok, e.question, chat=chat) for e in chunk]
            preds += [tok.decode(x) for x in batch_generate(model, tok, ids, config)]
        misses = [(e.question, e.answer, p) for e, p in zip(examples, preds)
                  if not T.check(task, e.question, p)]
        out[task] = ((len(examples) - len(misses)) / len(examples), misses, len(examples))
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)

    # 1. Corpus. The size follows from the step count (one pass, no repeats).
    tok_path = work / "tokenizer.model"
    weights = sum(TASK_WEIGHTS.values())
    n_total = examples_needed(args.steps, args.batch_size, args.seq_len, AVG_SAMPLE_TOKENS)
    per_task = {t: round(n_total * w / weights) for t, w in TASK_WEIGHTS.items()}
    records = T.training_records(per_task, args.seed)
    log(f"corpus: {len(records):,} training dialogs ({', '.join(f'{t} {n:,}' for t, n in per_task.items())})")

    # 2. Tokenizer (on the training text only: held-out words are never whole pieces).
    if tok_path.is_file() and (args.resume or args.measure or args.card_only):
        log(f"tokenizer: reusing {tok_path}")
        tok = Tokenizer(tok_path)
    else:
        corpus = work / "tokenizer_corpus.txt"
        corpus.write_text(tokenizer_corpus(records), encoding="utf-8")
        tic = time.time()
        train_tokenizer([corpus], work / "tokenizer", args.vocab, num_threads=1)
        tok = Tokenizer(tok_path)
        log(f"tokenizer: {tok.vocab_size} pieces (BPE, digits split, byte fallback) in "
            f"{time.time() - tic:.1f}s -> {tok_path}")

    rng = random.Random(f"{args.seed}:bpe-dropout")
    samples = [to_sample(tok, r, f"train.jsonl line {i}", rng, args.bpe_dropout)
               for i, r in enumerate(records, 1)]
    n_drop = sum(s.tokens != to_sample(tok, r, "").tokens for s, r in zip(samples, records))
    log(f"BPE-dropout {args.bpe_dropout} on the words of {n_drop:,} word-task prompts")
    n_tok = sum(len(s) for s in samples)
    log(f"samples: {len(samples):,}, {n_tok:,} tokens ({n_tok / len(samples):.1f} a sample), "
        f"{sum(s.num_targets for s in samples):,} answer tokens")
    batches = SFTBatches(samples, args.batch_size, args.seq_len, pack=True, seed=args.seed)
    st = batches.stats()
    log(f"batches: {st.batches} of {args.batch_size} packed rows x {args.seq_len} "
        f"({st.rows} rows, fill {st.fill:.1%})")

    pieces = piece_stats(tok)
    if args.card_only:
        report = json.loads((work / "scores.json").read_text())
        report.setdefault("epochs", report["steps"] / st.batches)
        report["pieces"] = pieces
        margs = ModelArgs.from_dict(report["model_args"])
        (args.out / "MODEL_CARD.md").write_text(model_card(report, margs, per_task, st))
        log(f"wrote {args.out / 'MODEL_CARD.md'}")
        return 0

    heldout = T.heldout_examples(args.eval_n, seed=args.seed)
    if not args.measure:
        with open(work / "train.jsonl", "w") as f:
            for r in records:
                rec = ({"messages": r["messages"]} if "messages" in r
                       else {"prompt": r["raw"][0], "completion": r["raw"][1], "raw": True})
                f.write(json.dumps({**rec, "task": r["task"]}) + "\n")
        with open(work / "heldout.jsonl", "w") as f:
            for task, exs in heldout.items():
                for e in exs:
                    f.write(json.dumps({"messages": T.to_messages(e), "task": task}) + "\n")
    val_samples = [tokenize_record({"messages": T.to_messages(e)}, tok, f"heldout {task}")
                   for task, exs in heldout.items() for e in exs[:40]]
    val = SFTBatches(val_samples, args.batch_size, args.seq_len, pack=True, seed=0, shuffle=False)

    # 3. Model and training.
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, vocab_size=tok.vocab_size,
                      multiple_of=args.multiple_of, max_seq_len=args.context)
    mx.random.seed(args.seed)
    model = Transformer(margs)
    mx.eval(model.parameters())
    n_params = num_params(model)
    log(f"model: dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads / "
        f"{margs.n_kv_heads} KV heads (GQA), FFN {margs.hidden_dim}, vocab {margs.vocab_size}: "
        f"{n_params:,} parameters")

    config = TrainConfig(
        lr=args.lr, warmup=args.warmup, min_lr_ratio=0.1, schedule="cosine",
        weight_decay=args.weight_decay, betas=(0.9, 0.95), eps=1e-5, clip=1.0,
        iters=args.steps, val_every=0 if args.measure else args.val_every, val_batches=-1,
        val_at_start=False, save_every=0 if args.measure else args.save_every,
        keep_checkpoints=2, checkpoint_dir=None if args.measure else work / "checkpoints",
        resume=args.resume, seed=args.seed, progress=sys.stderr.isatty(),
        description="demo model",
    )
    clock = {"tic": time.time(), "tokens": 0, "first": None}
    # Every run of this work folder (an interrupted one included) with its time so far.
    runs_file = work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() and args.resume else []
    this_run = {"from_step": None, "steps": 0, "train_seconds": 0.0, "wall_seconds": 0.0}
    runs.append(this_run)

    def note_run(step: int) -> None:
        this_run.update(steps=step, train_seconds=time.time() - clock["tic"],
                        wall_seconds=time.time() - t_start)
        if not args.measure:
            runs_file.write_text(json.dumps(runs, indent=2))

    def on_step(step: int, m: dict) -> None:
        clock["tokens"] += m["tokens"]
        if clock["first"] is None:
            clock["first"] = step - 1
            this_run["from_step"] = step - 1
        if step % args.log_every == 0 or step == args.steps or args.measure:
            note_run(step)
            el = time.time() - clock["tic"]
            done = step - clock["first"]
            eta = el / done * (args.steps - step)
            log(f"step {step}/{args.steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                f"grad norm {m['grad_norm']:.2f}  {clock['tokens'] / el:,.0f} tok/s  "
                f"elapsed {el / 60:.1f} min  eta {eta / 60:.1f} min")
        if args.measure and step >= clock["first"] + args.measure:
            raise StopTraining

    result = train(model, sft_loss, batches, config, val_batches=lambda: val(0),
                   on_step=on_step, log=log)
    if args.measure:
        log(f"measured: {result.tokens_per_sec:,.0f} tokens/s "
            f"({result.seconds / max(result.steps, 1):.2f} s a step); "
            f"{args.steps} steps would take ~{result.seconds / max(result.steps - (result.resumed_from or 0), 1) * args.steps / 60:.0f} min")
        return 0
    for s, v in result.val_losses:
        log(f"val loss at step {s}: {v:.4f}")

    # 4. Save (bf16), reload the saved folder and score it.
    from llama2_mlx.checkpoints.export import save_model
    from llama2_mlx.checkpoints.load import load

    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    out = save_model(model, args.out, tok_path)
    model, tok = load(out)
    tic = time.time()
    scores = score(model, tok, heldout, chat=True)
    train_check = score(model, tok, {t: T.make_examples(t, 50, args.seed + 7, "train", unique=True)
                                     for t in T.TASKS}, chat=True)
    raw_scores = score(model, tok, {t: exs[:50] for t, exs in heldout.items()}, chat=False)
    log(f"scored in {time.time() - tic:.0f}s")
    log("held-out accuracy (greedy, exact match; chat format):")
    for t in T.TASKS:
        acc, misses, n = scores[t]
        ex = f"  e.g. {misses[0][0]!r} -> {misses[0][2]!r} (want {misses[0][1]!r})" if misses else ""
        log(f"  {t:8s} {acc:6.1%} of {n:3d}   (train-split {train_check[t][0]:6.1%}, "
            f"bare prompt {raw_scores[t][0]:6.1%}){ex}")

    report = {
        "seed": args.seed, "params": n_params, "args": {k: str(v) for k, v in vars(args).items()},
        "model_args": margs.to_hf_config(), "samples": len(samples), "tokens_per_epoch": n_tok,
        "steps": result.steps, "resumed_from": result.resumed_from,
        "epochs": result.steps / st.batches,
        "train_seconds_this_run": result.seconds, "tokens_per_sec": result.tokens_per_sec,
        "wall_seconds_this_run": time.time() - t_start,
        "final_train_loss": result.train_losses[-1][1] if result.train_losses else None,
        "val_losses": result.val_losses,
        "heldout": {t: {"accuracy": a, "n": n, "misses": m[:10]} for t, (a, m, n) in scores.items()},
        "train_split": {t: a for t, (a, _, _) in train_check.items()},
        "bare_prompt": {t: a for t, (a, _, _) in raw_scores.items()},
        "machine": machine(), "pieces": pieces,
        "package_bytes": sum(p.stat().st_size for p in Path(out).iterdir()),
    }
    note_run(result.steps)
    this_run["train_seconds"] = result.seconds  # the trainer's count (no validation)
    this_run["wall_seconds"] = report["wall_seconds_this_run"]
    runs_file.write_text(json.dumps(runs, indent=2))
    report["runs"] = runs
    (work / "scores.json").write_text(json.dumps(report, indent=2))
    (Path(out) / "MODEL_CARD.md").write_text(model_card(report, margs, per_task, st))
    log(f"wrote {out} ({report['package_bytes'] / 1e6:.1f} MB) and {work / 'scores.json'}")
    return 0


def piece_stats(tok: Tokenizer) -> dict:
    """How the tokenizer cuts the listed words of each split."""
    out = {}
    for split in T.SPLITS:
        n = [len(tok.encode(w, bos=False)) for w in T.universe().words[split]]
        out[split] = sum(n) / len(n)
        out[f"{split}_single"] = sum(x == 1 for x in n)
        out[f"{split}_words"] = len(n)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, "
            f"MLX {mx.__version__} ({mx.default_device()})")


def model_card(r: dict, margs: ModelArgs, per_task: dict, st) -> str:
    train_s = sum(x["train_seconds"] for x in r["runs"])
    wall_s = sum(x["wall_seconds"] for x in r["runs"])
    rows = "\n".join(
        f"| {t} | {r['heldout'][t]['accuracy']:.1%} | {r['heldout'][t]['n']} | "
        f"{r['train_split'][t]:.1%} | {r['bare_prompt'][t]:.1%} | {T_DESCRIPTIONS[t]} |"
        for t in T.TASKS
    )
    a = r["args"]
    return f"""# llama2-mlx demo model

A tiny chat model with the Llama 2 architecture, trained from scratch on a synthetic
chat corpus so that every answer can be checked by a program. It is what
`llama2 generate` and `llama2 chat` load when no `--model` is given. It knows the
six toy tasks below and nothing else: it is a test fixture and a demonstration, not
an assistant. For a real model pass `--model` a Llama 2 checkpoint folder or hub id
(e.g. `meta-llama/Llama-2-7b-chat-hf`).

## Architecture

| | |
|---|---|
| parameters | {r['params']:,} |
| dim / layers | {margs.dim} / {margs.n_layers} |
| attention | {margs.n_heads} query heads, {margs.n_kv_heads} KV heads (grouped-query attention), head dim {margs.head_dim} |
| FFN | SwiGLU, hidden {margs.hidden_dim} (Meta's rule with multiple_of {margs.multiple_of}) |
| norm / position | RMSNorm (eps {margs.norm_eps}), RoPE theta {margs.rope_theta:g} |
| context | {margs.max_seq_len} tokens |
| vocabulary | {margs.vocab_size} SentencePiece pieces, untied input/output embeddings |
| weights | {a['dtype']}, Hugging Face layout ({r['package_bytes'] / 1e6:.1f} MB with the tokenizer) |

Vocabulary size: the corpus has only a few hundred distinct words; {margs.vocab_size} pieces
(3 specials, 256 byte-fallback pieces, {margs.vocab_size - 259} BPE pieces: characters and merges)
make nearly every word of the templates, units and countries a single piece and still leave
the listed words as sub-word pieces. A
vocabulary of a few thousand would, on this corpus, only add embedding rows for pieces too
rare to be learnt (or whole-word pieces that make spelling unlearnable).

## Tokenizer

Trained with `llama2_mlx.chat.tokenizer.train_tokenizer`, Llama 2's recipe: SentencePiece BPE,
digits split into single digits, byte fallback for anything unknown (so any UTF-8 text
encodes), BOS 1, EOS 2, no padding piece. It was trained on the training text only (no
held-out word is a single piece), with each word of the word list counted once rather than
every time it occurs, so that those words are made of sub-word pieces shared between words
(as in real text) instead of being one piece each: the model learns to spell pieces, which
carries over to words it never saw.

## Data

`llama2_mlx/demo/tasks.py` generates the corpus (seed {r['seed']}): {r['samples']:,}
training dialogs in the Llama 2 chat format (`[INST] ... [/INST] answer`),
{r['tokens_per_epoch']:,} tokens, packed into rows of {a['seq_len']} tokens
({st.rows:,} rows, {st.fill:.0%} filled), seen {r['epochs']:.2f} times. The loss is on the answer tokens only (§3.1 of the
Llama 2 paper). 15% of the dialogs carry a system prompt, 15% have an earlier turn, and 10%
are bare prompts (`BOS question answer EOS`, for `llama2 generate` without `--chat`).
Examples per task: {', '.join(f'{t} {n:,}' for t, n in per_task.items())}.
Half of the counting, spelling and reversing prompts without a system prompt have their
pieces cut at random into smaller pieces of the vocabulary (each piece with probability
{a['bpe_dropout']}, recursively: a seeded form of BPE-dropout, Provilkov et al. 2020), so that the
model sees the letters of smaller pieces too. The listed training words average
{r['pieces']['train']:.1f} pieces ({r['pieces']['train_single']} of {r['pieces']['train_words']} are one piece),
the held-out words {r['pieces']['heldout']:.1f} ({r['pieces']['heldout_single']} of {r['pieces']['heldout_words']}). Answers are always
encoded as at inference.

| task | example question | answer |
|---|---|---|
| add | What is 23 + 45? | 68 |
| count | How many words are in: red fox sun tree? | 4 |
| spell | Spell the word garden. | g a r d e n |
| reverse | Spell the word lemon backwards. | n o m e l |
| convert | Convert 7 meters to centimeters. | 700 |
| capital | What is the capital of France? | Paris |

Each task's question space is split once (fixed seed) into training and held-out parts;
held-out questions never occur in training: unseen number pairs (in either order), unseen
words (for counting, spelling and reversing), unseen (conversion, amount) pairs, and for the
capitals an unseen phrasing of each country's question (every capital is taught in the
other phrasings).

## Training

Full-parameter training from a random initialisation with the project's trainer
(`llama2_mlx.training.trainer.train`): AdamW (betas 0.9/0.95, eps 1e-5, weight decay {a['weight_decay']}),
peak learning rate {a['lr']}, {a['warmup']} warmup steps, cosine decay to 10% of the peak,
gradient clipping 1.0 (the pretraining recipe of §2.2, scaled down), {r['steps']} steps of
{a['batch_size']} packed rows, float32, seed {r['seed']}; saved in {a['dtype']}.

It took {train_s / 60:.0f} minutes of training ({wall_s / 60:.0f} minutes for the whole script,
scoring included{f", over {len(r['runs'])} resumed runs" if len(r['runs']) > 1 else ""}) at {r['tokens_per_sec']:,.0f} tokens/s on {r['machine']}, shared with
other jobs. Training loss at the last step {r['final_train_loss']:.3f} (per answer token).

Reproduce it with `python scripts/train_demo_model.py` (the defaults made this model).

## Scores

Held-out accuracy, greedy decoding, exact match after stripping whitespace, checked by
`llama2_mlx.demo.tasks.check` (which recomputes the answer from the question). The
train-split column is 50 training questions per task; the bare-prompt column is the first
50 held-out questions without the chat format.

| task | held-out accuracy | questions | train split | bare prompt | held out |
|---|---|---|---|---|---|
{rows}

## Limitations

Outside these six question shapes its output is meaningless. It has never seen a word
outside its list of ~350 words and 40 countries; numbers stay below 100 for addition and
the amounts of the conversion table. With about half an hour of CPU training it has learnt
the capitals well and unit conversion and word counting partly; it spells and reverses many
training words but few unseen ones, and it has not learnt addition. The loss was still
falling at the end: a longer run (`--steps 6000`, about twice the time) should do better.
"""


T_DESCRIPTIONS = {
    "add": "unseen pairs a + b, 0-99",
    "count": "1-8 unseen words",
    "spell": "unseen words",
    "reverse": "unseen words",
    "convert": "unseen (conversion, amount)",
    "capital": "an unseen phrasing per country",
}


if __name__ == "__main__":
    sys.exit(main())
