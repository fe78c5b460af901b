"""The ``llama2-mlx`` model type for EleutherAI's lm-evaluation-harness (``pip install -e
'.[eval]'``).

lm-eval 0.4.13 finds model types only in its own registry: it has no entry-point group
for plugins, so ``lm_eval --model llama2-mlx`` works only once this module has been
imported. Two ways to run it, both the lm-eval command line with the model registered:

    llama2 lm-eval --model llama2-mlx --model_args model=M,adapter_path=A --tasks hellaswag
    python -m llama2_mlx.eval.harness --model llama2-mlx --model_args model=M --tasks ...

and from Python: ``import llama2_mlx.eval.harness`` (or call ``register()``), then
``lm_eval.simple_evaluate(model="llama2-mlx", model_args=...)``.

Model arguments: ``model`` (folder or hub id), ``adapter_path``, ``dtype`` (float32,
bfloat16, float16), ``chat`` (true: each request's context is the user turn of a Llama 2
chat, ``BOS [INST] context [/INST]``, and the continuation the assistant's answer,
scored with the EOS that ends it, as ``llama2 eval`` scores a prompt/completion record),
``max_length`` (longest input; default the model's), ``batch_size``.

Scoring goes through ``perplexity.score_samples``, the code of ``llama2 eval``: a
request's context and continuation become a sample whose targets are the continuation's
tokens, so ``loglikelihood`` is minus ``llama2 eval``'s summed NLL of the same tokens.
Outside chat mode a non-empty context is encoded with BOS (Llama 2 was trained with it;
lm-eval's ``hf`` model omits it unless ``add_bos_token=True``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from llama2_mlx.errors import Llama2Error

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # pragma: no cover - the eval extra is not installed
    raise ImportError(
        "lm-evaluation-harness is not installed: pip install -e '.[eval]' "
        "(or pip install lm_eval==0.4.13)"
    ) from e

from llama2_mlx.eval.perplexity import score_samples
from llama2_mlx.training.data import Sample

MODEL_TYPE = "llama2-mlx"
DEFAULT_BATCH = 8


def register() -> None:
    """Register ``llama2-mlx`` with lm-eval (lazily: the class is imported when used).
    lm-eval's own model types are registered first (it only adds them to an empty
    registry)."""
    import lm_eval.models  # noqa: F401  (registers the built-in model types)
    from lm_eval.api.registry import model_registry

    if MODEL_TYPE not in model_registry:
        # By name, so that running this file as __main__ registers the importable class.
        model_registry.register(MODEL_TYPE, target="llama2_mlx.eval.harness:Llama2MLX")


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Llama2Error(f"model_args {name}={value!r}: expected true or false")


def _batch_size(value) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):  # "auto", "auto:4", None
        return DEFAULT_BATCH


class Llama2MLX(TemplateLM):
    """A Llama 2 model (and adapters) of this package as an lm-eval ``LM``."""

    def __init__(self, model: Optional[str] = None, adapter_path: Optional[str] = None,
                 dtype: Optional[str] = None, chat=False, max_length: Optional[int] = None,
                 batch_size=None, max_batch_size=None, device=None, *,
                 pretrained=None, lm=None, tokenizer=None, **unused):
        super().__init__()
        if lm is None:
            model = model or pretrained
            if model is None:
                raise Llama2Error("model_args: give model=FOLDER_OR_REPO")
            from llama2_mlx.checkpoints.load import load

            lm, tokenizer = load(model, dtype=None if dtype in (None, "auto") else dtype,
                                 adapter_path=adapter_path)
        elif adapter_path is not None:
            from llama2_mlx.models.lora import load_adapters, twin

            lm = load_adapters(twin(lm), adapter_path)
        lm.eval()
        self.model, self.tok = lm, tokenizer
        self.chat = _flag(chat, "chat")
        self.max_length = int(max_length or lm.args.max_seq_len)
        self.batch_size = _batch_size(batch_size)
        self.name = f"{model or 'model'}{'+' + str(adapter_path) if adapter_path else ''}"

    # --- tokens -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return f"{self.tok.model_path}{':chat' if self.chat else ''}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kw) -> list[int]:
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def chat_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + EOS) of a one-turn chat: ``lora-train``'s tokens."""
        (prompt, _), (answer, _) = self.tok.chat_segments(
            [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}],
            where="lm-eval request")
        return prompt, answer

    # --- scoring ------------------------------------------------------------------
    def score(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True):
        """(log-likelihood, is greedy) of each continuation after its context (token ids);
        contexts are cut from the left to fit ``max_length`` + 1 tokens."""
        results = [(0.0, True)] * len(pairs)  # an empty continuation: nothing to score
        samples, kept = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                continue
            if len(cont) > self.max_length:
                raise Llama2Error(f"lm-eval request {i}: continuation of {len(cont)} tokens "
                                  f"is longer than max_length {self.max_length}")
            tokens = (list(ctx) + list(cont))[-(self.max_length + 1):]
            targets = [False] * (len(tokens) - len(cont)) + [True] * len(cont)
            samples.append(Sample(tokens, targets, f"lm-eval request {i}"))
            kept.append(i)
        if samples:
            s = score_samples(self.model, samples, batch_size=self.batch_size,
                              max_seq_length=max(len(x) for x in samples) - 1,
                              progress=not disable_tqdm, description="lm-eval")
            for i, nll, greedy in zip(kept, s.nll, s.greedy):
                results[i] = (-float(nll), bool(greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        out = self.score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self.chat:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        pairs = [self.chat_pair(*req.args) for req in requests]
        return self._loglikelihood_tokens(
            [(req.args, c, t) for req, (c, t) in zip(requests, pairs)], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood after BOS, in windows of ``max_length`` tokens
        (lm-eval's rolling windows: every token is predicted once)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (string,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(string, bos=False), self.prefix_token_id, self.max_length, 1)]
            total = sum(ll for ll, _ in self.score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --- generation ---------------------------------------------------------------
    def prompt(self, context: str) -> list[int]:
        if self.chat:
            return self.tok.encode_chat([{"role": "user", "content": context}])
        return self.tok.encode(context, bos=True)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from llama2_mlx.generation.generate import GenerationConfig, generate

        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), 256)
            until = handle_stop_sequences(kw.pop("until", None), eos=None)
            max_tokens = int(kw.pop("max_gen_toks"))
            if max_tokens >= self.max_length:
                raise Llama2Error(f"max_gen_toks {max_tokens} >= max_length {self.max_length}")
            temp = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            ids = self.prompt(context)[-(self.max_length - max_tokens):]
            config = GenerationConfig(max_tokens=max_tokens, temp=temp, stop=list(until),
                                      top_p=float(kw.get("top_p") or 1.0), seed=kw.get("seed"))
            text = generate(self.model, self.tok, ids, config)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise Llama2Error("llama2-mlx: lm-eval's --apply_chat_template is not supported; "
                          "pass model_args chat=true for the Llama 2 chat format")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm-eval's command line (``lm_eval ARGS``) with ``llama2-mlx`` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


register()

if __name__ == "__main__":
    main()
