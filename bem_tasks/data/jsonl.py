"""JSONL files with one validated pydantic row per line.

Writes are atomic (temp file + rename) and byte-deterministic for the same rows: keys keep the
model's field order and separators are fixed. Reads validate every line and report problems as
``file:line: field: message`` so a broken data file points straight at the offending row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bem_tasks.io import atomic_write_text

M = TypeVar("M", bound=BaseModel)


class DataFileError(ValueError):
    """A data file that does not match its row schema; ``str()`` is ``file:line: field: message``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


def _to_obj(row: BaseModel | Mapping[str, Any]) -> Any:
    if isinstance(row, BaseModel):
        return row.model_dump(mode="json")
    return dict(row)


def dumps_row(row: BaseModel | Mapping[str, Any]) -> str:
    """The exact line ``write_jsonl`` writes for ``row`` (no trailing newline)."""
    return json.dumps(_to_obj(row), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def write_jsonl(
    path: str | os.PathLike[str], rows: Iterable[BaseModel | Mapping[str, Any]]
) -> Path:
    """Atomically write ``rows`` (pydantic models or plain mappings) as JSON Lines.

    An empty ``rows`` is refused: readers reject empty files, so writing one would only move the
    error to a later, less obvious place.
    """
    lines = [dumps_row(r) for r in rows]
    if not lines:
        raise ValueError(f"{path}: refusing to write an empty JSONL file (no rows given)")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_splits(
    out_dir: str | os.PathLike[str], splits: Mapping[str, Iterable[BaseModel | Mapping[str, Any]]]
) -> dict[str, Path]:
    """Write each split to ``<out_dir>/<name>.jsonl``; returns the paths by split name."""
    return {
        name: write_jsonl(Path(out_dir) / f"{name}.jsonl", rows) for name, rows in splits.items()
    }


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "<row>"
        parts.append(f"{field}: {err['msg']}")
    return "; ".join(parts)


def read_jsonl(path: str | os.PathLike[str], model: type[M], *, strict: bool = True) -> list[M]:
    """Read and validate every line of ``path`` as ``model``.

    Validation is pydantic's strict JSON mode by default: ``"3"`` is not an int and ``true`` is
    not a number, so a hand-edited or foreign file cannot slip in coerced values.

    Raises ``DataFileError`` (a ``ValueError``) for a missing or empty file, a blank line, invalid
    JSON or a row that fails validation, naming the file, the 1-based line and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFileError(path, None, "file not found (expected a JSONL file)") from None
    except UnicodeDecodeError as exc:
        raise DataFileError(path, None, f"not UTF-8 text: {exc}") from None
    if not text.strip():
        raise DataFileError(
            path, None, f"file is empty (expected one JSON {model.__name__} per line)"
        )
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the trailing newline written by write_jsonl
    rows: list[M] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataFileError(path, lineno, "blank line (expected a JSON object)")
        try:
            json.loads(line)  # for a readable message; pydantic re-parses below
        except json.JSONDecodeError as exc:
            raise DataFileError(
                path, lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from None
        try:
            rows.append(model.model_validate_json(line, strict=strict))
        except ValidationError as exc:
            raise DataFileError(path, lineno, _format_validation(exc)) from None
    return rows
