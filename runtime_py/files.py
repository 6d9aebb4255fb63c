"""File checksums shared by the writers (compile) and readers (runtime) of every artifact."""

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: Path, files: dict[str, str], listed_in: str) -> None:
    """Refuse a folder whose files are missing or differ from the sha256 digests recorded in `listed_in`."""
    from elastilm import ElastiLMError

    for name, digest in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ElastiLMError(f"{path}: missing (listed in {listed_in}); rebuild or re-copy the folder")
        if sha256(path) != digest:
            raise ElastiLMError(f"{path}: sha256 mismatch with {listed_in}; the file is corrupt or was changed")
