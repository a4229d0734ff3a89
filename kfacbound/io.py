"""Files and JSON: atomic writes and conversion to strict JSON data, in one place.

- :func:`atomic_write`: ``write(tmp)`` into a temporary file beside the target, then rename it
  onto the target (``os.replace``, atomic on POSIX): a reader sees the old file or the new one,
  never a partial one, and a failure (an exception in ``write``, a serialisation error) leaves
  the target as it was and no temporary behind. A process killed mid-write may leave its
  temporary ``.<name>.<pid>.<random>.tmp``; the batch runner sweeps those (``.*.tmp*``).
- :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`write_csv_atomic`: text, JSON and
  CSV tables through it.
- :func:`to_jsonable`: numpy/torch scalars and arrays, paths, tuples and non-finite floats as
  strict JSON data; :func:`json_default`: a ``json.dumps(default=...)`` hook for numpy values;
  :func:`canonical_json`: the canonical text that job keys hash.

Temporary files are created with mode ``0o666`` minus the umask, so the renamed file has the
permissions a plain ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "canonical_json", "json_default", "to_jsonable",
           "write_csv_atomic", "write_json_atomic", "write_text_atomic"]


def _temporary(path: Path) -> Path:
    """A new, empty file ``.<name>.<pid>.<random>.tmp`` in the directory of ``path``."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary onto ``path`` (parents are created);
    on any failure the temporary is removed, ``path`` is left as it was and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


atomic_write_text = write_text_atomic  # the name kfacbound.checkpoint has always exported


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = True, default: Callable[[Any], Any] | None = None,
                      newline: bool = True) -> None:
    """``json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)`` (plus a final
    newline unless ``newline=False``) written atomically. The text is serialised before any
    file is touched, so an object that does not serialise raises and changes nothing. Pass
    ``to_jsonable(obj)`` for strict JSON (no NaN)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    write_text_atomic(path, text + "\n" if newline else text)


def write_csv_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]],
                     columns: Sequence[str]) -> None:
    """A CSV table written atomically: a header of ``columns``, then one line per row with
    those fields (others ignored; ``None`` and missing values as empty cells)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    write_text_atomic(path, buf.getvalue())


def to_jsonable(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as strict JSON data: dict keys become strings, tuples lists, numpy/torch scalars
    and arrays numbers and lists, paths strings, non-finite floats ``None`` (JSON has no NaN).
    Any other value goes through ``default`` (e.g. ``str``); without one it is a ``TypeError``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, default) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy and torch
        return to_jsonable(obj.tolist(), default)
    if hasattr(obj, "item"):
        return to_jsonable(obj.item(), default)
    if default is not None:
        return to_jsonable(default(obj))
    raise TypeError(f"result value of type {type(obj).__name__} is not JSON-able: {obj!r}")


def json_default(obj: Any) -> Any:
    """A ``json.dumps`` ``default`` hook: numpy scalars as numbers, numpy arrays as lists,
    anything else as its ``str``."""
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
