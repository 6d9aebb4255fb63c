"""The second packaged model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised to fp32): the elastified
model at full width is the original function (fp64), with transformers as the independent reference.

Qwen2 differs from SmolLM2 where the reorder could go wrong: biases on q/k/v (permuted with their rows), 7 query
heads per KV head (heads move only within their KV group), and an untied LM head.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from elastilm.compile import reference
from elastilm.compile.elastify import ElastifyOptions, elastify
from elastilm.compile.ingest import resolve
from elastilm.formats import elastic as artifact
from elastilm.formats.config import ModelConfig

pytestmark = pytest.mark.real

PROMPTS = [
    "def quicksort(items):\n",
    "<|im_start|>user\nGive me two tips for writing clear emails.<|im_end|>\n<|im_start|>assistant\n",
]


def test_reordered_qwen_is_the_same_function(tmp_path):
    out = tmp_path / "qwen"
    elastify("qwen2.5-coder-0.5b", out, ElastifyOptions(calib_samples=2), progress=False)
    model = artifact.load(out)
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (24, 14, 2, False)
    assert any(h != list(range(len(h))) for h in _head_orders(out))  # the reorder moved heads: not a no-op test
    _compare(model)


@torch.no_grad()
def _compare(model):
    cfg = model.config
    _, path = resolve("qwen2.5-coder-0.5b")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = [model.tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    hf32 = [hf(input_ids=i, use_cache=False).logits for i in ids]
    original_cfg = ModelConfig.from_hf(hf.config)
    original = {k: v.double() for k, v in hf.state_dict().items()}
    del hf
    truth = [reference.logits(original, original_cfg, i) for i in ids]  # original weights and order, fp64
    del original
    reordered64 = {k: v.double() for k, v in model.params.items()}
    for prompt, i, t, h in zip(PROMPTS, ids, truth, hf32):
        reordered = reference.logits(reordered64, cfg, i, model.widths(1.0))
        assert t.abs().max() > 5  # real logits, not a degenerate output
        print(
            f"{prompt[:20]!r}: reordered vs original (fp64) {(reordered - t).abs().max():.1e}; "
            f"transformers fp32 vs fp64 truth {(h - t).abs().max():.1e}"
        )
        assert (reordered - t).abs().max() <= 1e-9  # the same function, up to fp64 rounding
        assert (h - t).abs().max() <= 1e-3  # transformers agrees with our fp64 truth: an independent check


def _head_orders(folder):
    from safetensors.torch import load_file

    orders = load_file(folder / "importance.safetensors")
    return [row.tolist() for row in orders["head_order"]]
