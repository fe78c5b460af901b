"""``llama2 gatt``: Ghost Attention data (§3.3) for ``lora-train``."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

import typer

from cli.common import DATA as _D
from cli.common import SAMPLING as _S
from cli.common import add_command, cli_errors, dtype_name, eprint, opt
from cli.options import AdapterOpt, DTypeOpt, ModelOpt, NoProgressOpt, field_option, given
from llama2_mlx.rlhf.gatt import GAttConfig

_GATT = GAttConfig()  # the command's defaults, which its options show


@cli_errors
def gatt(
    model: ModelOpt,
    dialogs: Annotated[str, opt("JSONL of dialogs: {\"messages\": [...]} with the user turns "
                                "(assistant turns, if any, are sampled anew).", _D)],
    instructions: Annotated[str, opt("Instructions, one a line (or a .jsonl of strings / "
                                     "{\"instruction\": ...}); one is drawn per dialog.", _D)],
    out: Annotated[str, opt("Output folder: train.jsonl for lora-train --data.", _D)],
    adapter_path: AdapterOpt = None,
    reward_model: Annotated[Optional[str], opt(
        "Reward model folder: with -k > 1 each turn keeps the best of the k answers.", _D,
        "--reward-model")] = None,
    k: Optional[int] = field_option(_GATT, "k", "-k", "--k", panel=_S),
    temp: Optional[float] = field_option(_GATT.generation, "temp"),
    top_p: Optional[float] = field_option(_GATT.generation, "top_p"),
    max_tokens: Optional[int] = field_option(_GATT.generation, "max_tokens"),
    seed: Optional[int] = field_option(_GATT.generation, "seed"),
    separator: Optional[str] = field_option(_GATT, "separator", panel=_D),
    dtype: DTypeOpt = None, no_progress: NoProgressOpt = False,
    overwrite: Annotated[bool, opt("Replace a train.jsonl already in --out.", _D,
                                   "--overwrite")] = False,
) -> None:
    """Ghost Attention: append an instruction to every user turn, sample the answers turn by
    turn, keep the instruction in the first turn only and train on the last answer alone."""
    from pathlib import Path

    from llama2_mlx.rlhf.gatt import gatt_files

    generation = dataclasses.replace(_GATT.generation, **given(
        temp=temp, top_p=top_p, max_tokens=max_tokens, seed=seed))
    config = GAttConfig(**given(k=k, separator=separator), generation=generation)
    config.check()
    path = gatt_files(model, dialogs, instructions, out, config, adapter_path=adapter_path,
                      reward_model=reward_model, dtype=dtype_name(dtype),
                      progress=not no_progress, overwrite=overwrite, log=eprint)
    eprint(f"GAtt records written to {Path(path).resolve()}")


def register(app: typer.Typer) -> None:
    add_command(app, "gatt", gatt)
