"""Tiny random Llama/Qwen2 models, built with transformers as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from elastilm.formats.config import ModelConfig

# Odd sizes on purpose: 6 query heads in 2 KV groups, 40 FFN neurons, head_dim 8.
TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)),
    "llama-untied-bias": lambda: LlamaForCausalLM(
        LlamaConfig(**TINY, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    ),
    "llama-mha": lambda: LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 6}, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False)),
}


# A tiny model whose widths are whole groups of 32 (hidden 64, 4 heads of 32, 96 FFN neurons in blocks of 32), for
# the quantized builds; not part of `VARIANTS`, so the other tests do not run on it.
GROUPED = {
    "llama-grouped": lambda: LlamaForCausalLM(
        LlamaConfig(
            # a vocabulary of three strips of 64: the quantized LM head runs its strip schedule
            **{**TINY, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32, "num_attention_heads": 4}
            | {"vocab_size": 192},
            tie_word_embeddings=True,
        )
    ),
}


# what fills a packed array outside the active prefix: garbage words, NaN scales (0x7E00: an fp16 NaN)
POISON = {np.dtype(np.uint32): 0xFFFFFFFF, np.dtype(np.uint16): 0x7E00}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every unit matters (the default init makes near-constant logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def tiny_model(variant: str, seed: int = 0):
    """(transformers model, our params dict, our config) for one tiny variant."""
    torch.manual_seed(seed)
    hf = {**VARIANTS, **GROUPED}[variant]().eval()
    randomize(hf, seed)
    cfg = ModelConfig.from_hf(hf.config)
    params = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return hf, params, cfg


@pytest.fixture(params=list(VARIANTS))
def tiny(request):
    return tiny_model(request.param)


def save_hf_folder(path, variant, seed: int = 0):
    """A tiny random model saved as a Hugging Face folder, with a word-level tokenizer; returns (params, cfg)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf, params, cfg = tiny_model(variant, seed)
    hf.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(path)
    return params, cfg


def elastified_tiny(tmp_path_factory, variant: str, neuron_multiple: int = 1):
    """A tiny random model saved as a Hugging Face folder and elastified (2 calibration windows); returns the
    elastify output folder. Neuron blocks of 1 put levels on odd widths."""
    from elastilm.compile.elastify import ElastifyOptions, elastify

    src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("elastic")
    save_hf_folder(src, variant)
    elastify(
        str(src),
        out,
        ElastifyOptions(calib_samples=2, calib_seq_len=12, neuron_multiple=neuron_multiple),
        progress=False,
    )
    return out


def small_tlm(levels, layers: int = 1, seed: int = 0):
    """A TLM: the pretrained MiniLM backbone cut to `layers`, with large random heads (so scores and decisions
    vary); returns (torch model, metadata)."""
    from elastilm.compile import tlm_model

    model, meta = tlm_model.create(levels, layers, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model.score, model.decide[0], model.ratio, model.level):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5 * 3)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval(), meta


def tiny_build_with_tlm(tmp_path_factory):
    """A tiny elastified model with its layer-drop variants and a random TLM built together for the host, with a
    synthetic latency.json in which time grows with the level (or the layers kept) and the prompt; returns
    (build folder, TLM metadata)."""
    import json

    from elastilm.compile import layer_drop, tlm_model
    from elastilm.compile.build import build

    folder = elastified_tiny(tmp_path_factory, "llama")
    levels = [lv["fraction"] for lv in json.loads((folder / "elastic.json").read_text())["levels"]]
    model, meta = small_tlm(levels)
    tlm_model.save(model, meta, folder)
    layers = layer_drop.layer_drop(folder, progress=False)["variants"]
    out = build(folder, "host-cpu", max_len=64)
    kept = {
        int(n): 1 - int(n) / len(json.loads((folder / "layer_drop.json").read_text())["block_influence"])
        for n in layers
    }
    (out / "latency.json").write_text(
        json.dumps(
            {
                "schema": "elastilm.latency",
                "schema_version": 2,
                "prompt_lengths": [4, 32],
                "levels": [{"fraction": f, "ttft_ms": [f * 4, f * 32], "tpot_ms": [1 + f] * 2} for f in levels],
                "layer_drop": [
                    {
                        "fraction": k,
                        "dropped": n,
                        "layers": layers[str(n)],
                        "ttft_ms": [k * 4, k * 32],
                        "tpot_ms": [1 + k] * 2,
                    }
                    for n, k in kept.items()
                ],
            }
        )
    )
    return out, meta


def random_adapters(model, rank: int, seed: int) -> dict:
    """Large random LoRA adapters {fraction: {projection: (A, B)}} for every level below 1.0 of an ElasticModel: a
    wrong slice or a missing term shows in the logits."""
    from elastilm.formats.config import projection_names

    g = torch.Generator().manual_seed(seed)
    out = {}
    for lv in list(model.levels.values())[:-1]:
        out[lv.fraction] = {}
        for name in projection_names(model.config):
            rows, cols = model.params[name + ".weight"].shape
            out[lv.fraction][name] = (
                torch.randn(rank, cols, generator=g) / cols**0.5,
                torch.randn(rows, rank, generator=g) / rank,
            )
    return out


def random_ids(cfg: ModelConfig, batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def numpy_attention(qs, k_all, v_all, past: int, heads: int, hd: int, n_kv: int, group):
    """Causal GQA attention of qs (T, heads*hd) over cache rows [0, past+T): the reference for the kernels."""
    import numpy as np

    tokens = qs.shape[0]
    S = past + tokens
    expected = np.zeros((tokens, heads * hd), "float32")
    for j in range(heads):
        g = j % n_kv if group is None else j // group
        kq, vq = k_all[:S, g * hd : (g + 1) * hd], v_all[:S, g * hd : (g + 1) * hd]
        scores = qs[:, j * hd : (j + 1) * hd] @ kq.T / np.sqrt(hd)
        scores[np.arange(S)[None, :] > past + np.arange(tokens)[:, None]] = -np.inf
        p = np.exp(scores - scores.max(1, keepdims=True))
        expected[:, j * hd : (j + 1) * hd] = (p / p.sum(1, keepdims=True)) @ vq
    return expected


@pytest.fixture
def pocl_platform():
    """Skip without PoCL, except in CI (.ci/run installs it and sets ELASTILM_REQUIRE_POCL=1: a skip would hide a failure)."""
    import os

    from elastilm.elastic_ops import pocl

    if not pocl.available():
        if os.environ.get("ELASTILM_REQUIRE_POCL") == "1":
            pytest.fail("PoCL is required here: apt-get install pocl-opencl-icd; pip install pyopencl")
        pytest.skip("no OpenCL platform (apt-get install pocl-opencl-icd)")
