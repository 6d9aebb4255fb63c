"""Tiny random Llama/Qwen2 models, built with transformers as the independent reference."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from elastilm.compile.config import ModelConfig

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
    hf = VARIANTS[variant]().eval()
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


def random_ids(cfg: ModelConfig, batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
