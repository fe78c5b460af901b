"""Llama 2's RLHF (§3.2): preference data, the reward model, rejection sampling and its loop."""
