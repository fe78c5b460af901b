"""Evaluation: held-out negative log-likelihood of a base model and its adapters, with
bootstrap intervals (``perplexity``, ``report``)."""
