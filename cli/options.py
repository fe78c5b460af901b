"""Options of several commands, defined once, and options made from dataclass fields.

Every default and help text of a library option is written once, in its dataclass
field (``field(default=..., metadata={"help": ...})``). ``field_option`` turns such a
field into a command-line option; the commands only name the fields.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from cli.common import DATA, LORA, SAMPLING, SPECULATIVE, TRAINING, DType
from llama2_mlx.generation.generate import GenerationConfig
from llama2_mlx.models.lora import LoRAConfig
from llama2_mlx.rlhf.rejection import RSConfig
from llama2_mlx.training.sft import DataConfig, SFTOptions
from llama2_mlx.training.trainer import TrainConfig

# The help panel of a dataclass's options unless a command says otherwise.
PANELS = {SFTOptions: DATA, DataConfig: DATA, LoRAConfig: LORA, TrainConfig: TRAINING,
          GenerationConfig: SAMPLING, RSConfig: SAMPLING}


def field_help(cls, name: str) -> str:
    """The ``help`` metadata of field ``name`` of dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]


def shown(value: Any) -> Optional[str]:
    """A default as help shows it; None (nothing shown) for None, off and a sequence (the
    help describes those: LoRAConfig.keys's is all projections, "all")."""
    if value is None or value is False or isinstance(value, (tuple, list)):
        return None
    return "on" if value is True else str(value)


def field_option(owner, name: str, *flags: str, panel: Optional[str] = None):
    """A ``typer.Option`` for field ``name`` of ``owner``, a dataclass instance holding a
    command's defaults: its help is the field's ``help`` and the default it shows is
    ``owner``'s value.

    The option itself defaults to None, "not given": a command passes on only what was
    given (``given``), so the library's defaults apply (and, for ``lora-train``, a config
    file sets what the command line does not) and the CLI never repeats a default.
    """
    return typer.Option(
        None, *flags, help=field_help(type(owner), name),
        show_default=shown(getattr(owner, name)) or False,
        rich_help_panel=panel or PANELS[type(owner)],
    )


def given(**values) -> dict:
    """The options given on the command line (not None), a choice as its value."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in values.items() if v is not None}


ModelOpt = Annotated[str, typer.Option("--model", "-m", help=field_help(SFTOptions, "model"),
                                       rich_help_panel=DATA)]
# generate, chat and demo eval fall back on the bundled demo model.
DemoModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model folder or Hugging Face repo id (default: the bundled demo model).")]
DTypeOpt = Annotated[Optional[DType], typer.Option(help=field_help(SFTOptions, "dtype"))]
AdapterOpt = Annotated[Optional[str], typer.Option(help="Folder of LoRA adapters to apply.")]
# Long commands: --no-progress (the training commands take TrainConfig's PROGRESS).
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress", help="Hide the progress bar (and, off a terminal, its log lines).")]

# lora-train's defaults, which are also reward-train's and rs-loop's for the options
# below (tests/test_cli_options.py checks each command against its own defaults).
SFT_DEFAULTS = SFTOptions()
RANK = field_option(SFT_DEFAULTS.lora, "rank")
SCALE = field_option(SFT_DEFAULTS.lora, "scale")
KEYS = field_option(SFT_DEFAULTS.lora, "keys")
NUM_LAYERS = field_option(SFT_DEFAULTS.lora, "num_layers")
BATCH_SIZE = field_option(SFT_DEFAULTS.data, "batch_size", panel=TRAINING)
MAX_SEQ_LENGTH = field_option(SFT_DEFAULTS.data, "max_seq_length")
GRAD_ACCUM = field_option(SFT_DEFAULTS.train, "grad_accum")
CLIP = field_option(SFT_DEFAULTS.train, "clip")
EPOCHS = field_option(SFT_DEFAULTS.train, "epochs")
ITERS = field_option(SFT_DEFAULTS.train, "iters")
SAVE_EVERY = field_option(SFT_DEFAULTS.train, "save_every")
RESUME = field_option(SFT_DEFAULTS.train, "resume", "--resume")
OVERWRITE = field_option(SFT_DEFAULTS.train, "overwrite", "--overwrite")
GRAD_CHECKPOINT = field_option(SFT_DEFAULTS.train, "grad_checkpoint", "--grad-checkpoint")
SEED = field_option(SFT_DEFAULTS.train, "seed")
PROGRESS = field_option(SFT_DEFAULTS.train, "progress", "--progress/--no-progress")
LOG_EVERY = field_option(SFT_DEFAULTS.train, "log_every")

# Sampling: generate's defaults (chat's differ in max_tokens only), and rejection
# sampling's (rejection-sample, rs-loop: temperature 1, seed 0).
GEN_DEFAULTS = GenerationConfig()
CHAT_DEFAULTS = GenerationConfig(max_tokens=512)
RS_DEFAULTS = RSConfig()
TEMP = field_option(GEN_DEFAULTS, "temp")
TOP_P = field_option(GEN_DEFAULTS, "top_p")
TOP_K = field_option(GEN_DEFAULTS, "top_k")
MIN_P = field_option(GEN_DEFAULTS, "min_p")
REPETITION_PENALTY = field_option(GEN_DEFAULTS, "repetition_penalty")
SAMPLING_SEED = field_option(GEN_DEFAULTS, "seed")
MAX_KV_SIZE = field_option(GEN_DEFAULTS, "max_kv_size")
PROMPT_LOOKUP = field_option(GEN_DEFAULTS, "prompt_lookup", panel=SPECULATIVE)
DRAFT_MODEL = field_option(GEN_DEFAULTS, "draft_model", panel=SPECULATIVE)
NUM_DRAFT_TOKENS = field_option(GEN_DEFAULTS, "num_draft_tokens", panel=SPECULATIVE)
RS_K = field_option(RS_DEFAULTS, "k", "-k", "--k")
RS_TEMP = field_option(RS_DEFAULTS.generation, "temp")
RS_TOP_P = field_option(RS_DEFAULTS.generation, "top_p")
RS_TOP_K = field_option(RS_DEFAULTS.generation, "top_k")
RS_MAX_TOKENS = field_option(RS_DEFAULTS.generation, "max_tokens")
RS_SEED = field_option(RS_DEFAULTS.generation, "seed")
