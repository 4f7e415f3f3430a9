"""What every argparse command of `experiments/` does around its work.

A user's mistake (a missing file, a bad option, a checkpoint of another model) should
read as one message, not a traceback: configuration and input errors are raised as
ValueError (gin's ConfigError, StateDictMismatchError and ModelDirectoryError are
ValueErrors), FileNotFoundError or, for an optional dependency, ImportError.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)
MAX_ERROR_LINES = 40  # a key-mismatch list can be long; the rest is summarised


def add_model_arguments(parser) -> None:
    """--workdir | --checkpoint, one required: where `evaluate.load_model` finds a model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="pretraining run directory (config.gin, checkpoints/)")
    source.add_argument("--checkpoint", help="converted model directory (config.json, weights/)")


def read_json_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not
    a JSON object is a ValueError naming the file and the line."""
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            items.append((number, item))
    return items


def error_message(error: BaseException) -> str:
    """`error: <message>`, cut to MAX_ERROR_LINES lines."""
    lines = str(error).splitlines() or [type(error).__name__]
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"  ... ({len(lines) - MAX_ERROR_LINES} more lines)"]
    return "error: " + "\n".join(lines)


def run_command(work: Callable[[], object]) -> int:
    """Runs `work()`; returns the exit status: 0, or 1 after printing a user error."""
    from absl import logging

    # orbax warns that a training checkpoint's item has no metadata file of its own.
    logging.set_verbosity(logging.ERROR)
    try:
        work()
    except USER_ERRORS as error:
        print(error_message(error), file=sys.stderr)
        return 1
    return 0
