"""Small IO helpers shared by every entry point.

- ``UserError``: a problem with the user's input. Entry points print its message as one line and exit 2,
  never a traceback.
- ``atomic_write`` / ``atomic_path``: write to a temp file beside the target, then rename, so an interrupted run
  never leaves a half-written output.
- ``safe_join``: resolve a corpus-relative path, refusing absolute paths and ``..`` escapes.
- ``cli``: decorator for ``main()`` functions that turns ``UserError`` into one clear line.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

MANIFEST_FIELDS = ["ID", "wav", "duration", "spk_id", "language", "text", "phn"]


class UserError(Exception):
    """Bad input or configuration; the message names the file/row and the fix."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: ``UserError`` becomes ``error: <msg>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """``open()`` look-alike whose result appears at ``path`` only once the block finished."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


def safe_join(root: str | os.PathLike, rel: str, where: str = "") -> Path:
    """``root/rel`` for a corpus-relative ``rel``; refuses absolute paths and ``..`` components."""
    loc = f"{where}: " if where else ""
    if not rel or not rel.strip():
        raise UserError(f"{loc}empty path; give a path relative to the corpus")
    if os.path.isabs(rel) or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise UserError(f"{loc}absolute path {rel!r} not allowed; paths must be relative to the corpus folder")
    parts = Path(rel).parts
    if ".." in parts:
        raise UserError(f"{loc}path {rel!r} leaves the corpus ('..'); paths must stay inside the corpus folder")
    root = Path(root).resolve()
    out = (root / rel).resolve()
    if out != root and root not in out.parents:
        raise UserError(f"{loc}path {rel!r} resolves outside the corpus {root}")
    return out


def write_manifest(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write a SpeechBrain CSV manifest (docs/design.md columns) atomically; return the row count."""
    n = 0
    with atomic_write(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
    return n


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a manifest CSV; checks the header and that it has rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; run data_prep/make_manifests.py first")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("ID", "wav", "duration", "phn") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(MANIFEST_FIELDS)}")
        rows = list(reader)
    if not rows:
        raise UserError(f"{path}: manifest is empty; check the data_prep filters (prep_report.json)")
    return rows
