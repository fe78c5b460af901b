"""The bundled demo model: a tiny Llama 2 chat model trained from scratch on toy tasks.

``default_model_path()`` is the folder (Hugging Face layout: config.json,
model.safetensors, tokenizer.model, MODEL_CARD.md) that ``llama2 generate``
and ``llama2 chat`` load when no ``--model`` is given; they print ``DEMO_NOTE``
on stderr. It is made by ``scripts/train_demo_model.py``; the tasks it was
trained on (and their checkers) are in ``llama2_mlx.demo.tasks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from llama2_mlx.errors import Llama2Error

ASSETS = Path(__file__).resolve().parent / "assets"

DEMO_NOTE = (
    "note: no --model given, so this is the bundled demo model: a ~1M-parameter Llama 2 "
    "chat model trained from scratch on toy tasks (addition, counting words, spelling, "
    "spelling backwards, unit conversion, capitals; scores in its MODEL_CARD.md) and it knows "
    "nothing else. For a real "
    "Llama 2 pass --model with a checkpoint folder (Meta or Hugging Face layout) or a hub "
    "id, e.g. --model meta-llama/Llama-2-7b-chat-hf."
)

# Questions the shipped model answers correctly in the chat format (greedy), one or two
# per task it has learnt; tests/test_demo.py checks them. It fails most additions
# (see MODEL_CARD.md for its scores).
EXAMPLES = (
    ("What is the capital of France?", "Paris"),
    ("Which city is the capital of Peru?", "Lima"),
    ("How many centimeters are in 4 meters?", "400"),
    ("How many cents are in 12 dollars?", "1200"),
    ("Spell the word garden.", "g a r d e n"),
    ("Spell the word lemon backwards.", "n o m e l"),
    ("How many words are in: cat dog?", "2"),
)


def default_model_path() -> Path:
    """The folder of the bundled demo model (raises ``Llama2Error`` if it is missing)."""
    if not (ASSETS / "config.json").is_file() or not (ASSETS / "model.safetensors").is_file():
        raise Llama2Error(
            f"{ASSETS}: the bundled demo model is missing (make it with "
            "`python scripts/train_demo_model.py`); pass --model PATH_OR_REPO"
        )
    return ASSETS


def model_or_demo(model, note: Optional[Callable[[str], None]] = None):
    """``model``, or when it is None the bundled demo model's folder (telling ``note``
    ``DEMO_NOTE``)."""
    if model is not None:
        return model
    path = default_model_path()
    if note is not None:
        note(DEMO_NOTE)
    return path
