"""Resolve a checkpoint argument to a local folder, downloading Hugging Face repo ids.

A local path wins; otherwise a ``owner/name`` repo id is fetched with
``huggingface_hub.snapshot_download`` (safetensors and Meta's files only, never the
pickled ``.bin`` weights), and each hub failure becomes one ``Llama2Error`` line with
advice (gated licence, login, offline cache, no such repo).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

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


def reference(path_or_repo: PathLike) -> str:
    """How a model is recorded and compared: an existing local path made absolute,
    anything else (a hub repo id) as given."""
    p = Path(str(path_or_repo)).expanduser()
    return str(p.resolve()) if p.exists() else str(path_or_repo)


def resolve(path_or_repo: PathLike) -> Path:
    """A local checkpoint folder (a file stands for its folder), downloading a repo id."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p if p.is_dir() else p.parent
    s = str(path_or_repo)
    if _REPO_ID.fullmatch(s):
        return _download(s)
    raise Llama2Error(
        f"{s}: no such file or folder (nor a Hugging Face repo id like "
        "meta-llama/Llama-2-7b-chat-hf)"
    )
