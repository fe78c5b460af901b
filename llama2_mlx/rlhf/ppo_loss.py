"""The pieces of PPO's objective (Touvron et al. 2023, §3.2.3), on plain arrays.

The paper maximises ``R(g|p) = R~c(g|p) - beta * D_KL(pi_theta(g|p) || pi_0(g|p))`` with
``R~c = WHITEN(LOGIT(R_c))``, ``R_c`` the gated helpfulness/safety probability (``gate``).
Here, per sampled sequence:

- ``logit``: the log-odds of ``R_c``, the probability clipped into ``[eps, 1 - eps]``
  first so that a reward of exactly 0 or 1 gives a finite number;
- ``whiten``: those log-odds over the iteration's batch, to mean 0 and standard
  deviation 1;
- ``sequence_kl``: the KL estimate of one answer, the sum over its generated tokens of
  ``log pi(token) - log pi_0(token)`` (the answer sampled from pi: an unbiased estimate
  of ``D_KL(pi || pi_0)`` for the prompt; the penalty, as in InstructGPT's and the
  paper's reward); ``token_kl``, the exact KL of each next-token distribution along the
  answer, is a lower-variance estimate of the same KL, reported beside it;
- ``ppo_rewards``: ``whiten(logit(R_c)) - beta * KL``, the penalty inside the
  per-sequence reward as in the paper (so it enters the advantages; no extra loss term);
- ``leave_one_out``: the departure from the paper, which trains a value model: the
  advantage of each of the K answers to one prompt is its reward minus the mean reward
  of the prompt's other K - 1 answers (a baseline that does not depend on the answer);
- ``clipped_surrogate``: PPO's clipped objective on per-token probability ratios, each
  answer token carrying its sequence's advantage, as a (sum, count) over the answer
  tokens of a batch (the trainer's loss convention: the mean is sum / count).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# The probability of a reward is kept this far from 0 and 1 before its log-odds.
LOGIT_EPS = 1e-6


def logit(p, eps: float = LOGIT_EPS) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities ``p``, clipped into ``[eps, 1 - eps]``."""
    q = np.clip(np.asarray(p, np.float64), eps, 1.0 - eps)
    return np.log(q) - np.log1p(-q)


def whiten(x, eps: float = 1e-8) -> np.ndarray:
    """``x`` shifted to mean 0 and scaled to standard deviation 1 (population std; a batch
    of equal values becomes all zeros)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean()
    return centred / (x.std() + eps)


def ppo_rewards(r_c, kl, beta: float) -> np.ndarray:
    """The per-sequence reward ``whiten(logit(r_c)) - beta * kl`` of a batch."""
    return whiten(logit(r_c)) - beta * np.asarray(kl, np.float64)


def leave_one_out(rewards, k: int) -> np.ndarray:
    """Advantages of rewards laid out prompt by prompt (K consecutive answers each): each
    reward minus the mean of the other K - 1 rewards of its prompt."""
    r = np.asarray(rewards, np.float64)
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs k >= 2 answers a prompt, got {k}")
    if r.ndim != 1 or r.size % k:
        raise ValueError(f"{r.size} rewards are not prompts of {k} answers each")
    g = r.reshape(-1, k)
    others = (g.sum(axis=1, keepdims=True) - g) / (k - 1)
    return (g - others).reshape(-1)


def token_logprobs(logits: mx.array, targets: mx.array, temp: float = 1.0) -> mx.array:
    """``log p(target)`` at each position of (B, T, V) logits (divided by ``temp``, the
    sampling temperature) for (B, T) target ids, in float32."""
    x = logits.astype(mx.float32)
    if temp != 1.0:
        x = x / temp
    picked = mx.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(x, axis=-1)


def token_kl(logits: mx.array, ref_logits: mx.array, temp: float = 1.0) -> mx.array:
    """The exact KL ``sum_v pi(v) (log pi(v) - log pi_0(v))`` of the next-token
    distributions at each position of (B, T, V) logits (both divided by ``temp``): summed
    over a sampled answer's positions, an estimate of the sequence KL that is never
    negative and has a lower variance than ``sequence_kl``'s (reported, not the penalty)."""
    x, y = logits.astype(mx.float32) / temp, ref_logits.astype(mx.float32) / temp
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    lq = y - mx.logsumexp(y, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1)


def sequence_kl(logp, ref_logp, mask):
    """Per-sequence KL estimates: the sum over the masked (answer) tokens of
    ``logp - ref_logp``; (B, T) arrays, numpy or mlx, give (B,)."""
    diff = (logp - ref_logp) * mask
    return diff.sum(axis=-1)


def clipped_surrogate(logp: mx.array, old_logp: mx.array, advantages: mx.array,
                      mask: mx.array, clip: float = 0.2) -> tuple[mx.array, mx.array, mx.array]:
    """PPO's clipped surrogate loss over a batch: ``(loss sum, tokens, clipped tokens)``.

    Per answer token, ratio ``= exp(logp - old_logp)`` and loss
    ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)`` with ``A`` its sequence's
    advantage ((B,), broadcast over the (B, T) tokens); ``mask`` picks the answer tokens.
    "Clipped" counts the tokens whose clipped term was the one taken (no gradient)."""
    ratio = mx.exp(logp - old_logp)
    a = advantages[:, None].astype(mx.float32)
    unclipped = ratio * a
    clipped = mx.clip(ratio, 1.0 - clip, 1.0 + clip) * a
    per_token = -mx.minimum(unclipped, clipped)
    m = mask.astype(mx.float32)
    taken_clipped = (clipped < unclipped).astype(mx.float32) * m
    return (per_token * m).sum(), m.sum(), taken_clipped.sum()


def answer_batch(prompts, answers, pad_id: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """``(inputs, targets, mask)`` (B, T) for one forward of each prompt + answer: row i is
    ``prompts[i] + answers[i]`` shifted by one (inputs: all but the last token; targets:
    all but the first), right-padded with ``pad_id`` to the longest row; ``mask`` is 1 at
    the positions whose target is an answer token (the answer's EOS included when it is
    one of its tokens), 0 on the prompt and the padding. Right padding changes no logit
    of a real position (causal attention)."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
    if len(rows) != len(answers) or not rows:
        raise ValueError("one answer per prompt, at least one")
    width = max(len(r) for r in rows) - 1
    inputs = np.full((len(rows), width), pad_id, np.int32)
    targets = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        n = len(row) - 1
        inputs[i, :n], targets[i, :n] = row[:-1], row[1:]
        mask[i, len(p) - 1 : n] = 1.0
    return mx.array(inputs), mx.array(targets), mx.array(mask)
