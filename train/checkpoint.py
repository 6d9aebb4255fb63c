"""Training checkpoints without pickle: tensors in a safetensors file, everything else (options, step, history,
optimizer hyper-parameters) as JSON in its metadata, so loading a checkpoint can never run code. Written whole
(formats/files.write_whole): a kill during a save leaves the previous checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import write_whole


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    write_whole(path, lambda partial: save_file(contiguous, str(partial), metadata={"meta": json.dumps(meta)}))


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint `save` wrote."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["meta"])
    except Exception as err:  # not a safetensors file (an older pickle checkpoint), or damaged
        raise ElastiLMError(f"{path}: not a readable checkpoint ({err}); delete it to start over") from None


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into tensors ("<prefix>/<param>/<key>") and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors = {f"{prefix}/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    plain = {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)} for i, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def load_optimizer_state(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state = {int(i): dict(values) for i, values in meta["plain"].items()}
    for name, value in tensors.items():
        head, i, key = name.rsplit("/", 2)
        if head == prefix:
            state.setdefault(int(i), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
