"""The model shape the pipeline works on, independent of where the checkpoint came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from elastilm.formats.errors import ElastiLMError

SUPPORTED_FAMILIES = ("llama", "qwen2")
KV_HEAD_MAPS = ("block", "interleaved")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder.

    `kv_head_map` says which KV head a query head j reads. "block" (Hugging Face order): j // (n_heads / n_kv).
    "interleaved" (our reordered order): j % n_kv, so that any prefix of query heads spreads over the KV groups
    rank by rank and the active query heads are always one contiguous prefix of q_proj rows.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    kv_head_map: str = "block"

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ElastiLMError(
                f"unsupported architecture '{self.family}': supported are {', '.join(SUPPORTED_FAMILIES)}"
            )
        if self.kv_head_map not in KV_HEAD_MAPS:
            raise ElastiLMError(f"kv_head_map must be one of {KV_HEAD_MAPS}, got '{self.kv_head_map}'")
        if self.num_heads % self.num_kv_heads:
            raise ElastiLMError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, head: int) -> int:
        if self.kv_head_map == "block":
            return head // self.group_size
        return head % self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """From a transformers `PretrainedConfig` (Llama or Qwen2)."""
        rope = getattr(hf, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ElastiLMError(f"RoPE scaling '{rope_type}' is not supported yet (only the default RoPE)")
        return cls(
            family=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
        )


# the linear layers of a decoder layer, in the order the compiled model takes their adapters
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def projection_names(cfg: ModelConfig) -> list[str]:
    """Every linear layer's parameter prefix, layer by layer, e.g. "model.layers.3.mlp.up_proj"."""
    return [f"model.layers.{i}.{p}" for i in range(cfg.num_layers) for p in PROJECTIONS]
