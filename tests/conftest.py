"""Shared fixtures: tiny random-weight models and a tiny SentencePiece tokenizer,
all created by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import random

import llama2_mlx  # noqa: F401  (first: it picks the BLAS, which must happen before mlx loads)
import mlx.core as mx
import pytest

from llama2_mlx.models.model import ModelArgs, Transformer

# A GQA config with ffn_dim_multiplier, like 70B but tiny.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
            ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=256)


def make_model(seed: int = 0, dtype=mx.float32, **overrides) -> Transformer:
    """A tiny random-weight Llama 2 model (norm weights randomised too)."""
    mx.random.seed(seed)
    args = ModelArgs(**{**TINY, **overrides})
    model = Transformer(args)
    # Non-trivial norm weights so that a mix-up of norms would show.
    for layer in model.layers:
        layer.input_layernorm.weight = 1 + 0.1 * mx.random.normal((args.dim,))
        layer.post_attention_layernorm.weight = 1 + 0.1 * mx.random.normal((args.dim,))
    model.model.norm.weight = 1 + 0.1 * mx.random.normal((args.dim,))
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_model() -> Transformer:
    return make_model()


CORPUS_WORDS = (
    "the quick brown fox jumps over the lazy dog llama model answer question what is "
    "one two three four five six seven eight nine ten plus minus times equals hello world "
    "please reverse spell count convert meters feet capital france paris italy rome"
).split()


def write_corpus(path, n_lines: int = 2000, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            words = [rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12))]
            f.write(" ".join(words) + f" {rng.randint(0, 9999)}.\n")
        f.write("café naïve 日本 ✓\n")


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A 512-piece BPE SentencePiece model trained like Llama 2's (digits split, byte fallback)."""
    from llama2_mlx.chat.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("spm")
    write_corpus(d / "corpus.txt")
    return train_tokenizer([d / "corpus.txt"], d / "tokenizer", 512, num_threads=1)


@pytest.fixture(scope="session")
def tok(spm_path):
    """The tokenizer of ``spm_path``."""
    from llama2_mlx.chat.tokenizer import Tokenizer

    return Tokenizer(spm_path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, spm_path):
    """``make_model()`` saved (HF layout) with the ``spm_path`` tokenizer."""
    from llama2_mlx.checkpoints.export import save_model

    return save_model(make_model(), tmp_path_factory.mktemp("tiny-model"), spm_path)


@pytest.fixture(scope="session")
def plain_dir(model_dir, tmp_path_factory):
    """``model_dir`` without a chat template (as a Meta download is): raw text prompts."""
    import shutil

    d = tmp_path_factory.mktemp("no-template")
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def demo_reward_model(tmp_path_factory):
    """A LoRA reward model (random head, rank 2, seed 0) on the bundled demo model."""
    from llama2_mlx.checkpoints.load import load
    from llama2_mlx.demo import default_model_path
    from llama2_mlx.models.lora import LoRAConfig, apply_lora
    from llama2_mlx.rlhf.reward_model import RewardModel, save_reward_model

    mx.random.seed(0)
    rm = RewardModel.from_policy(load(default_model_path())[0])
    lora = LoRAConfig(rank=2)
    apply_lora(rm, lora)
    return save_reward_model(rm, tmp_path_factory.mktemp("demo-rm") / "rm",
                             base_model=default_model_path(), lora_config=lora)


def target_runs(sample):
    """The maximal runs of a sample's target tokens (EOS kept as an id)."""
    runs, cur = [], []
    for t, y in zip(sample.tokens, sample.targets):
        if y:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (the whole walkthrough)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
