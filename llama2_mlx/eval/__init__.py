"""Evaluation: held-out negative log-likelihood of a base model and its adapters, with
bootstrap intervals (``perplexity``, ``report``), and a model type for EleutherAI's
lm-evaluation-harness (``harness``, needs the ``eval`` extra)."""
