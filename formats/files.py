"""What every on-disk format shares: file checksums, one schema-and-version check, whole-file writes.

Each format is a JSON document with `"schema": "elastilm.<name>"` and an integer `"schema_version"`; a reader
refuses any other pair by name, with the command that writes the format. Folders list their files with sha256
digests (`checksums`), checked before anything is loaded (`verify_files`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from pathlib import Path

from elastilm.formats.errors import ElastiLMError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: Path, files) -> dict[str, str]:
    """{relative path: sha256} of `files` (relative to `folder`), sorted."""
    return {str(f): sha256(Path(folder) / f) for f in sorted(map(str, files))}


def tree(folder: Path, skip=lambda relpath: False) -> dict[str, str]:
    """`checksums` of every file under `folder` but those `skip(relative path)` names (a manifest, say)."""
    folder = Path(folder)
    return checksums(
        folder, [p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not skip(p.relative_to(folder))]
    )


def verify_files(folder: Path, files: dict[str, str], listed_in: str) -> None:
    """Refuse a folder whose files are missing or differ from the sha256 digests recorded in `listed_in`."""
    for name, digest in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ElastiLMError(f"{path}: missing (listed in {listed_in}); rebuild or re-copy the folder")
        if sha256(path) != digest:
            raise ElastiLMError(f"{path}: sha256 mismatch with {listed_in}; the file is corrupt or was changed")


def write_whole(path: Path, write) -> Path:
    """`write(partial path)`, then that file made durable (fsync) and renamed over `path`: a crash or a kill at any
    point leaves the previous file (or none), never half of one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)
    return path


def write_json(path: Path, doc: dict) -> Path:
    """Write `doc` whole or not at all (`write_whole`)."""
    return write_whole(path, lambda partial: partial.write_text(json.dumps(doc, indent=2) + "\n"))


def check_schema(doc: dict, where: Path | str, schema: str, version: int, fix: str) -> dict:
    """`doc` if it is `schema` at `version`; otherwise an error naming both and how to write a current one."""
    if not isinstance(doc, dict) or (doc.get("schema"), doc.get("schema_version")) != (schema, version):
        found = f"{doc.get('schema')} v{doc.get('schema_version')}" if isinstance(doc, dict) else type(doc).__name__
        raise ElastiLMError(f"{where}: schema {found}, this elastilm reads {schema} v{version}; {fix}")
    return doc


def read_json(path: Path, schema: str, version: int, fix: str) -> dict:
    """The document at `path` after the schema and version check; `fix` says which command writes it."""
    path = Path(path)
    if not path.is_file():
        raise ElastiLMError(f"{path.parent}: no {path.name}; {fix}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ElastiLMError(f"{path}: not valid JSON ({e}); {fix}") from None
    return check_schema(doc, path, schema, version, fix)


def resumable_rows(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The rows of an append-only CSV written with `fields`, for a run that resumes it. A row cut short by a kill
    (the last one without its line end, or one with missing fields) is dropped with a warning and the file is
    rewritten whole without it, so that appending goes on cleanly; a file with other columns (another version of
    the writer) is refused."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    reader = csv.DictReader(io.StringIO(data.decode(errors="replace"), newline=""))
    rows = list(reader)
    if reader.fieldnames is not None and tuple(reader.fieldnames) != tuple(fields):
        raise ElastiLMError(
            f"{path} has the columns {reader.fieldnames}, not {list(fields)} (written by another version); "
            "move it away to start over"
        )
    whole = [r for r in rows if None not in r and None not in r.values()]  # extra fields or missing ones
    if not data.endswith(b"\n") and whole and whole[-1] is rows[-1]:
        whole.pop()  # the last line has no end: its last field may be cut short
    if len(whole) != len(rows):
        warnings.warn(f"{path}: dropped {len(rows) - len(whole)} torn row(s), left by an interrupted run", stacklevel=2)

        def rewrite(partial: Path) -> None:
            with partial.open("w", newline="") as f:
                writer = csv.DictWriter(f, fields)
                writer.writeheader()
                writer.writerows(whole)

        write_whole(path, rewrite)
    return whole
