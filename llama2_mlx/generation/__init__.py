"""Sampling and the generation ladder: step, stream, batch, K samples, chat sessions."""
