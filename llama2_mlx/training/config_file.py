"""``lora-train --config``: YAML or JSON files of options, ours or mlx-lm's.

A config file maps option names (``rank``, ``max_seq_length`` or ``max-seq-length``)
to values. mlx-lm's ``lora`` config keys are taken too where they mean the same:
``learning_rate``, ``lora_parameters`` (rank, scale, dropout, keys), ``steps_per_eval``,
``steps_per_report``, ``grad_accumulation_steps``; its keys that only restate what
``lora-train`` does (``train: true``, ``fine_tune_type: lora``, ``optimizer: adam``, an
unset ``lr_schedule``...) are accepted and dropped, and the ones that ask for something
else (``mask_prompt: false``, ``fine_tune_type: dora``) are refused with one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llama2_mlx.errors import Llama2Error, OptionError
from llama2_mlx.io.readers import exists, read_options

# mlx-lm's key -> ours.
MLX_LM_KEYS = {
    "learning_rate": "lr",
    "steps_per_eval": "val_every",
    "steps_per_report": "log_every",
    "grad_accumulation_steps": "grad_accum",
}
# mlx-lm's keys with the values that say what lora-train does anyway (dropped).
MLX_LM_SAME = {
    "train": (True,),                    # mlx-lm's flag (a string is ours: the data file)
    "test": (True, False),               # lora-train tests when there is a test split
    "fine_tune_type": ("lora",),
    "optimizer": ("adam", "adamw"),      # lora-train: AdamW (--weight-decay)
    "mask_prompt": (True,),              # lora-train: answer-only loss, always
    "lr_schedule": (None,),
    "resume_adapter_file": (None,),      # lora-train: --resume
    "config": (None,),
    "report_to": (None,),
    "project_name": (None,),
    "trust_remote_code": (False,),
}
# Keys whose value does not change a lora-train run.
MLX_LM_IGNORED = ("optimizer_config", "test_batches", "clear_cache_threshold")
LORA_PARAMETERS = ("rank", "scale", "dropout", "keys")


def from_mlx_lm(values: dict, where: str) -> dict:
    """``values`` with mlx-lm's keys (see the module's doc) turned into ours."""
    out = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k in MLX_LM_KEYS:
            out[MLX_LM_KEYS[k]] = value
        elif k == "lora_parameters":
            if not isinstance(value, dict):
                raise Llama2Error(f"{where}: lora_parameters must be a mapping")
            for name, v in value.items():
                if name not in LORA_PARAMETERS:
                    raise Llama2Error(f"{where}: lora_parameters.{name} is not a LoRA option "
                                      f"(have {', '.join(LORA_PARAMETERS)})")
                out[name] = v
        elif k in MLX_LM_SAME and (k not in ("train", "test") or isinstance(value, bool)):
            # (a string train / test is ours: the data file)
            if value not in MLX_LM_SAME[k]:
                raise Llama2Error(f"{where}: {key}: {json.dumps(value)} is not what lora-train "
                                  f"does (it takes {' or '.join(json.dumps(v) for v in MLX_LM_SAME[k])})")
        elif k not in MLX_LM_IGNORED:
            out[key] = value
    return out


def read_config_file(path, option: str = "config") -> dict:
    """The options of a YAML or JSON config file (a mapping of option names; mlx-lm's
    keys turned into ours); ``option`` names the option that gave the file. Read with
    ``io.readers.read_options``."""
    path = Path(path)
    if not exists(path):
        raise OptionError(f"{{{option}}}: {{path}} not found", path=path)
    values = read_options(path)  # bounded, regular files only, no YAML aliases
    _check_finite(values, path)
    return from_mlx_lm(values, str(path))


def _check_finite(values: dict, path: Path, where: str = "") -> None:
    """Refuse NaN and infinities (YAML's ``.nan`` / ``.inf``) in a config, naming the key:
    no option takes one, and a NaN learning rate would train NaN weights."""
    for key, value in values.items():
        if isinstance(value, dict):
            _check_finite(value, path, f"{where}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise Llama2Error(f"{path}: {where}{key} must be a finite number (got {value})")
