"""Resolve a checkpoint argument to a local folder, downloading Hugging Face repo ids.

A local path wins; otherwise a ``owner/name`` repo id is fetched with
``huggingface_hub.snapshot_download`` (safetensors and Meta's files only, never the
pickled ``.bin`` weights), and each hub failure becomes one ``Llama2Error`` line with
advice (gated licence, login, offline cache, no such repo).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Optional, Union

from llama2_mlx.errors import Llama2Error, one_line

PathLike = Union[str, os.PathLike]

# What a hub download fetches: safetensors (never the pickled .bin files) or Meta's layout.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "params.json",
    "consolidated.*.pth",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MAX_REPO_ID = 96  # what the Hub allows


def _download(repo_id: str) -> Path:
    # Looked up on the module at call time (and imported lazily: loading a local
    # folder never needs huggingface_hub), so tests can patch
    # ``huggingface_hub.snapshot_download``.
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except errors.GatedRepoError:
        raise Llama2Error(
            f"{repo_id} is gated: accept the licence on https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` (or `huggingface-cli login`, or set HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise Llama2Error(
            f"{repo_id}: no such local path, and no such model on the Hugging Face Hub "
            "(if it is private, log in with `hf auth login`)"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise Llama2Error(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?): connect to the network, or pass a local path"
        ) from None
    except errors.HfHubHTTPError as e:
        raise Llama2Error(
            f"downloading {repo_id} failed ({one_line(e, 100)}): check the network and your "
            "token (`hf auth login`), or pass a local path"
        ) from None
    except OSError as e:
        raise Llama2Error(
            f"downloading {repo_id} failed ({one_line(e, 100)}): pass a local path"
        ) from None


def _stat(p: Path) -> Optional[os.stat_result]:
    """``os.stat`` of ``p``, or None when there is nothing there (or the name is too long
    for the system, or holds a NUL: no such path either)."""
    try:
        return os.stat(p)
    except (OSError, ValueError):
        return None


def _shown(s: str) -> str:
    shown = s if s.isprintable() else ascii(s)
    return shown if len(shown) <= 80 else f"{shown[:60]}... ({len(s):,} characters)"


def reference(path_or_repo: PathLike) -> str:
    """How a model is recorded and compared: an existing local path made absolute,
    anything else (a hub repo id) as given."""
    p = Path(str(path_or_repo)).expanduser()
    return str(p.resolve()) if _stat(p) is not None else str(path_or_repo)


def check_repo_id(repo_id: str) -> None:
    """Refuse what Hugging Face does not take for a repo id (``a/..``, ``x/.git``, over
    96 characters), with its own validator, before any network access."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if len(repo_id) > MAX_REPO_ID or not _REPO_ID.fullmatch(repo_id):
        raise HFValidationError("not of the form owner/name")
    validate_repo_id(repo_id)


def resolve(path_or_repo: PathLike) -> Path:
    """A local checkpoint folder (a file stands for its folder), downloading a repo id."""
    s = str(path_or_repo)
    p = Path(s).expanduser()
    st = _stat(p)
    if st is not None:
        return p if stat.S_ISDIR(st.st_mode) else p.parent
    if _REPO_ID.fullmatch(s) and len(s) <= MAX_REPO_ID:
        from huggingface_hub.errors import HFValidationError

        try:
            check_repo_id(s)
        except HFValidationError as e:
            raise Llama2Error(
                f"{_shown(s)}: no such local path, and not a valid Hugging Face repo id "
                f"({one_line(e, 100)})"
            ) from None
        return _download(s)
    raise Llama2Error(
        f"{_shown(s)}: no such file or folder (nor a Hugging Face repo id like "
        "meta-llama/Llama-2-7b-chat-hf)"
    )
