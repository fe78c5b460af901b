"""A real PPO run (``llama2_mlx.rlhf.ppo_run.ppo``, §3.2.3 with a leave-one-out baseline
instead of a value model) on the bundled demo model, with a rule-based reward.

The reward R_c (a probability, as the gated reward model score would be) is
``sigmoid(4 - words)`` of the answer: short answers score high. It is checkable and it
generalises across prompts, so the held-out mean reward can show whether PPO moves the
policy; the demo model spells words (and spells them backwards) letter by letter, so a
short answer is a spelling cut short (the reward is hacked, as a rule invites: the point
is the optimiser, not the answers). Prompts: 48 spelling / spelling-backwards questions
of the demo model's training split for PPO, 32 others held out.

Run: ``python benchmarks/ppo_experiment.py [--iterations N] [--beta B[,B...]] [--lr LR]``
(the ``demo`` preset otherwise: batch 32 = 8 prompts x K 4, minibatch 8, so 4 gradient
steps an iteration, AdamW 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0, PPO clip 0.2).
Prints a markdown table per beta; the numbers are whatever they come out as.

One run (``--iterations 10 --beta 0.01,0.1``, 2 shared CPU cores, 21 s a beta; "exact"
KL: the summed next-token KLs along the sampled answers, "sampled": the summed log-ratios
of the sampled tokens, the penalty's estimate; 32 held-out prompts x 4 answers, the same
seeds at every evaluation):

| iteration | held-out reward (beta 0.01) | KL exact | KL sampled | answer tokens | held-out reward (beta 0.1) | KL exact |
|---|---|---|---|---|---|---|
| 0 | 0.463 | 0.000 | 0.000 | 6.20 | 0.463 | 0.000 |
| 1 | 0.473 | 0.033 | 0.041 | 6.14 | 0.473 | 0.033 |
| 2 | 0.479 | 0.123 | 0.158 | 6.09 | 0.479 | 0.122 |
| 3 | 0.510 | 0.308 | 0.415 | 5.96 | 0.510 | 0.305 |
| 4 | 0.535 | 0.728 | 0.718 | 5.84 | 0.533 | 0.696 |
| 5 | 0.566 | 1.440 | 1.376 | 5.68 | 0.563 | 1.243 |
| 6 | 0.587 | 1.843 | 1.694 | 5.56 | 0.576 | 1.640 |
| 7 | 0.622 | 2.153 | 2.287 | 5.42 | 0.606 | 1.982 |
| 8 | 0.633 | 2.620 | 2.395 | 5.37 | 0.626 | 2.361 |
| 9 | 0.675 | 3.418 | 3.215 | 5.14 | 0.656 | 2.967 |
| 10 | 0.722 | 4.133 | 4.123 | 4.87 | 0.684 | 3.607 |

The held-out reward rises at every evaluation; the KL to pi_0 grows with it, less with
the larger penalty (3.6 against 4.1 nats an answer after 10 iterations). The demo
preset's learning rate (5e-4, for LoRA on a 1M-parameter model in a few iterations) is
far above the paper's 1e-6.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama2_mlx  # noqa: E402,F401  (picks the BLAS before mlx loads)
import numpy as np  # noqa: E402

from llama2_mlx.checkpoints.shared import SharedBase  # noqa: E402
from llama2_mlx.demo import default_model_path  # noqa: E402
from llama2_mlx.demo.tasks import make_examples, to_messages  # noqa: E402
from llama2_mlx.rlhf.ppo import preset_config  # noqa: E402
from llama2_mlx.rlhf.ppo_run import ppo  # noqa: E402


def short_answers(prompt, answers, is_safety_prompt):
    return [float(1 / (1 + np.exp(len(a.split()) - 4.0))) for a in answers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--beta", default="0.01", help="comma-separated KL penalties, one run each")
    ap.add_argument("--lr", type=float, default=None, help="default: the demo preset's")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    qs = [to_messages(e)[:-1] for t in ("spell", "reverse")
          for e in make_examples(t, 40, 0, "train", unique=True)]
    train, held = qs[:24] + qs[40:64], qs[24:40] + qs[64:80]
    base = SharedBase.load(default_model_path(), "float32")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo-experiment-"))
    for beta in [float(b) for b in args.beta.split(",")]:
        over = {"lr": args.lr} if args.lr is not None else {}
        config = preset_config("demo", iterations=args.iterations, beta=beta, progress=False,
                               **over)
        policy, tok = base.policy()
        tic = time.perf_counter()
        result = ppo(policy, tok, short_answers, train, work / f"beta-{beta:g}", config,
                     eval_prompts=held, overwrite=True, log=lambda s: None)
        seconds = time.perf_counter() - tic
        train_reward = {h["iteration"]: h["reward"] for h in result.history}
        print(f"\nbeta {beta:g}, lr {config.lr:g}, {args.iterations} iterations, "
              f"{seconds:.1f}s ({work / f'beta-{beta:g}'})\n")
        print("| iteration | held-out mean reward | held-out KL (exact) | held-out KL (sampled) "
              "| held-out answer tokens | batch reward (before the update) |")
        print("|---|---|---|---|---|---|")
        for e in result.evals:
            it = e["iteration"]
            tr = f"{train_reward[it]:.3f}" if it in train_reward else "-"
            print(f"| {it} | {e['eval_reward']:.3f} | {e['eval_kl']:.3f} | "
                  f"{e['eval_kl_sampled']:.3f} | {e['eval_answer_tokens']:.2f} | {tr} |")


if __name__ == "__main__":
    main()
