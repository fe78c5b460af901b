"""Checked readers of the text files the project takes as input (JSON, JSONL).

Every failure is one ``Llama2Error`` line naming the file (and the line, for JSONL).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama2_mlx.errors import Llama2Error


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object; every failure is one line naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise Llama2Error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise Llama2Error(f"{path}: expected a JSON object")
    return data


def read_jsonl(path, strings: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file (``strings``: a bare
    JSON string ``s`` is accepted as the record ``{"prompt": s}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Llama2Error(f"{path}: data file not found") from None
    except UnicodeDecodeError as e:
        raise Llama2Error(f"{path}: not UTF-8 text ({e.reason})") from None
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Llama2Error(f"{path} line {i}: invalid JSON ({e.msg}, column {e.colno})") from None
        if strings and isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict):
            raise Llama2Error(f"{path} line {i}: expected a JSON object, got {type(rec).__name__}")
        records.append((i, rec))
    if not records:
        raise Llama2Error(f"{path}: empty file (no records)")
    return records
