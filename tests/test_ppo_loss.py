"""PPO's objective pieces (§3.2.3) on constructed numbers: logit, whitening, the KL
penalty in the per-sequence reward, leave-one-out advantages, the clipped surrogate."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.rlhf.ppo_loss import (
    clipped_surrogate,
    leave_one_out,
    logit,
    ppo_rewards,
    sequence_kl,
    token_logprobs,
    whiten,
)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_logit_inverts_the_sigmoid_and_stays_finite_at_0_and_1():
    np.testing.assert_allclose(logit(sigmoid([-3.0, 0.0, 1.0, 2.5])), [-3.0, 0.0, 1.0, 2.5],
                               atol=1e-9)
    edge = logit([0.0, 1.0])
    np.testing.assert_allclose(edge, [-math.log(1e6 - 1), math.log(1e6 - 1)], rtol=1e-9)
    assert np.isfinite(edge).all()


def test_whiten_gives_mean_0_and_std_1():
    got = whiten([1.0, 2.0, 3.0, 4.0])
    s = math.sqrt(1.25)
    np.testing.assert_allclose(got, [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], atol=1e-7)
    np.testing.assert_allclose(whiten([7.0, 7.0, 7.0]), [0.0, 0.0, 0.0])
    x = whiten(np.random.RandomState(0).normal(3.0, 5.0, 100))
    assert abs(x.mean()) < 1e-9 and abs(x.std() - 1) < 1e-6


def test_the_kl_penalty_is_subtracted_after_whitening_the_log_odds():
    # logit(sigmoid(i)) = i = 0..3 -> whitened -1.342, -0.447, 0.447, 1.342; beta 0.01.
    got = ppo_rewards(sigmoid([0, 1, 2, 3]), kl=[0.0, 10.0, 0.0, 100.0], beta=0.01)
    s = math.sqrt(1.25)
    np.testing.assert_allclose(got, [-1.5 / s, -0.5 / s - 0.1, 0.5 / s, 1.5 / s - 1.0], atol=1e-7)


def test_sequence_kl_sums_log_ratios_over_the_answer_tokens_only():
    logp = np.array([[-1.0, -2.0, -3.0, -9.0], [-0.5, -0.5, -7.0, -7.0]])
    ref = np.array([[-1.5, -2.0, -1.0, 0.0], [-1.0, -0.25, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # padding after each answer
    np.testing.assert_allclose(sequence_kl(logp, ref, mask), [0.5 + 0 - 2.0, 0.5 - 0.25])
    got = sequence_kl(mx.array(logp), mx.array(ref), mx.array(mask))
    np.testing.assert_allclose(np.array(got), [-1.5, 0.25], atol=1e-6)


def test_leave_one_out_subtracts_the_mean_of_the_other_answers():
    got = leave_one_out([1.0, 2.0, 3.0, 10.0, 10.0, 40.0], k=3)
    np.testing.assert_allclose(got, [1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 25.0, 10 - 25.0, 40 - 10.0])
    np.testing.assert_allclose(got.reshape(2, 3).sum(axis=1), [0.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out([1.0, 2.0], k=1)
    with pytest.raises(ValueError, match="not prompts of 3"):
        leave_one_out([1.0, 2.0], k=3)


def test_token_logprobs_pick_the_target_under_the_sampling_temperature():
    logits = mx.log(mx.array([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    targets = mx.array([[0, 2]])
    np.testing.assert_allclose(np.array(token_logprobs(logits, targets)),
                               [[math.log(0.5), math.log(0.7)]], atol=1e-6)
    # temp 2: p ~ sqrt(p): 0.7071 / (0.7071 + 0.5 + 0.5)
    got = np.array(token_logprobs(logits, targets[:, :1] * 0, temp=2.0))[0, 0]
    assert got == pytest.approx(math.log(math.sqrt(0.5) / (math.sqrt(0.5) + 1.0)), abs=1e-6)


def test_clipped_surrogate_takes_the_pessimistic_term_and_clips_at_0_2():
    ratios = np.array([0.5, 1.0, 1.5, 1.1, 3.0])
    logp = mx.array(np.log(np.stack([ratios, ratios])), mx.float32)
    old = mx.zeros_like(logp)
    adv = mx.array([2.0, -1.0])
    mask = mx.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])  # the last token is padding
    total, count, n_clipped = clipped_surrogate(logp, old, adv, mask, clip=0.2)
    # A = 2: min(r A, clip(r) A) = 1, 2, 2.4 (1.5 clipped to 1.2), 2.2
    # A = -1: min(-r, -clip(r)) = -0.8 (0.5 clipped to 0.8), -1, -1.5, -1.1
    want = -(1 + 2 + 2.4 + 2.2) + (0.8 + 1 + 1.5 + 1.1)
    assert total.item() == pytest.approx(want, abs=1e-5)
    assert count.item() == 8 and n_clipped.item() == 2

    # No gradient through a clipped token; -r A elsewhere (d ratio / d logp = ratio).
    def loss(lp):
        return clipped_surrogate(lp, old, adv, mask, clip=0.2)[0]

    g = np.array(mx.grad(loss)(logp))
    np.testing.assert_allclose(g, [[-1.0, -2.0, 0.0, -2.2, 0.0], [0.0, 1.0, 1.5, 1.1, 0.0]],
                               atol=1e-5)
    # The ratio is 1 at the policy that sampled (the first minibatch): the loss is -mean(A).
    total, count, n_clipped = clipped_surrogate(old, old, adv, mask)
    assert total.item() / count.item() == pytest.approx(-0.5) and n_clipped.item() == 0


def test_answer_batch_masks_the_answer_tokens_and_pads_on_the_right():
    from llama2_mlx.rlhf.ppo_loss import answer_batch

    inputs, targets, mask = answer_batch([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], pad_id=0)
    assert np.array(inputs).tolist() == [[1, 5, 6, 8, 9], [1, 7, 0, 0, 0]]
    assert np.array(targets).tolist() == [[5, 6, 8, 9, 2], [7, 3, 0, 0, 0]]
    assert np.array(mask).tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_token_kl_is_the_exact_kl_of_each_next_token_distribution():
    from llama2_mlx.rlhf.ppo_loss import token_kl

    p, q = mx.log(mx.array([[[0.5, 0.5], [0.9, 0.1]]])), mx.log(mx.array([[[0.25, 0.75], [0.9, 0.1]]]))
    got = np.array(token_kl(p, q))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    np.testing.assert_allclose(got, [[want, 0.0]], atol=1e-6)
    assert want > 0 and (np.array(token_kl(q, p)) >= 0).all()
