"""Weight quantization schemes: what a build's manifest records about its weights, named as MLC-LLM names them
(qAfB_id: A bits per weight, B bits per activation; the id says how).

  q0f32      fp32 weights (no quantization), fp32 activations
  q4f32_1    4-bit weights, 8 per uint32; one fp32 scale per group of 32 inputs (symmetric, MLC-LLM's q4f32_1)
  q8f32_1    8-bit weights, 4 per uint32; likewise
  q4f32_mix  4-bit asymmetric groups (a scale and a minimum each, as llama.cpp's Q4_1) on the attention, gate and
             up projections; 8-bit symmetric groups on down_proj and on the embedding / LM head; scales and
             minima stored as fp16 bit patterns (as llama.cpp's Q4_1 and Q8_0 blocks store theirs), read as fp32,
             and so are the recovery adapters (half the bytes a level's adapter adds to each decoded token)

Symmetric groups (`Format`): scale = max|w| / qmax over a group of `group` inputs of one output row, stored
q = round(w / scale) + qmax clamped to [0, 2 qmax], read back (q - qmax) * scale (qmax = 7 for 4 bits, 127 for 8).
Asymmetric groups: step = (max w - min w) / (2^bits - 1), stored q = round((w - min) / step) in [0, 2^bits - 1],
read back q * step + min: a group's smallest and largest weights are exact.

Why q4f32_mix: SmolLM2's packaged weights are llama.cpp Q4_1 blocks (asymmetric 4-bit groups of 32 along the
inputs) and its embedding Q8_0. Asymmetric groups along the same inputs reproduce the attention, gate and up
weights exactly, since the reorder moves whole output rows (and o_proj's inputs in whole heads). down_proj's
inputs are the FFN neurons, which the reorder moves one at a time, so its groups mix neurons of different source
blocks; 8 bits keep those, and the embedding, close. Full-width held-out perplexity of the packaged model
(8 x 256 tokens, benchmarks/probe_quant_error.py): fp32 37.49, q4f32_mix 37.46, q8f32_1 37.54, q4f32_1 51.76.

The packed layout (compile/quantize.py) keeps both prefixes of a level contiguous, so every active width must be
a whole number of groups (`check_width`). A quantized scheme covers every linear layer and the embedding table
(the tied LM head: one copy serves both); norms and biases stay fp32, the recovery adapters too except in
q4f32_mix.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastilm.formats.errors import ElastiLMError


@dataclass(frozen=True)
class Format:
    """How one quantized tensor is stored: `bits` per weight packed in uint32 words, a scale per `group` inputs of
    a row and, when `asymmetric`, a minimum per group too; fp32, or with `half` fp16 bit patterns in uint16 words
    (1 + 1 bits per 4-bit weight instead of 2 + 2; the kernels widen them to fp32 with integer operations, so no
    target needs fp16 arithmetic, e.g. OpenCL without cl_khr_fp16)."""

    bits: int
    group: int = 32
    asymmetric: bool = False
    half: bool = False

    @property
    def per_word(self) -> int:
        """Weights per uint32 word."""
        return 32 // self.bits

    @property
    def qmax(self) -> int:
        """The symmetric offset: stored levels are q + qmax."""
        return 2 ** (self.bits - 1) - 1

    @property
    def top(self) -> int:
        """The highest stored level."""
        return 2**self.bits - 1 if self.asymmetric else 2 * self.qmax

    @property
    def scale_dtype(self) -> str:
        """The dtype of the stored scales and minima."""
        return "uint16" if self.half else "float32"

    def describe(self) -> dict:
        return {"bits": self.bits, "group": self.group, "asymmetric": self.asymmetric, "scales": self.scale_dtype}


@dataclass(frozen=True)
class Scheme:
    """A build's weights: `linear` for every linear layer (None: fp32), with `down_proj` and `embedding` (the
    embedding table and an untied LM head) overriding it where set."""

    name: str
    linear: Format | None
    down_proj: Format | None = None
    embedding: Format | None = None
    half_adapters: bool = False  # the recovery adapters stored as fp16 bits (uint16), like `Format.half`

    @property
    def adapter_dtype(self) -> str:
        """The dtype of the library's adapter inputs."""
        return "uint16" if self.half_adapters else "float32"

    @property
    def quantized(self) -> bool:
        return self.linear is not None

    @property
    def group(self) -> int:
        return self.linear.group if self.linear else 1

    def format(self, tensor: str) -> Format | None:
        """The format of a checkpoint tensor (e.g. "model.layers.3.mlp.down_proj"), None when it stays fp32."""
        if self.linear is None:
            return None
        if "down_proj" in tensor:
            return self.down_proj or self.linear
        if "embed_tokens" in tensor or "lm_head" in tensor:
            return self.embedding or self.linear
        return self.linear

    def describe(self) -> dict:
        """The manifest's record: the scheme's name and the format of each kind of weight."""
        if self.linear is None:
            return {"scheme": self.name}
        kinds = {"linear": self.linear, "down_proj": self.format("down_proj"), "embedding": self.format("embed_tokens")}
        return {
            "scheme": self.name,
            **{kind: f.describe() for kind, f in kinds.items()},
            "adapters": self.adapter_dtype,
        }

    def check_width(self, width: int, what: str, fix: str) -> None:
        """Refuse an active width (inputs of a projection) that is not a whole number of groups."""
        if self.quantized and width % self.group:
            raise ElastiLMError(f"{what} is {width}, not a whole number of {self.name}'s groups of {self.group}; {fix}")


SCHEMES = {
    s.name: s
    for s in (
        Scheme("q0f32", None),
        Scheme("q4f32_1", Format(4)),
        Scheme("q8f32_1", Format(8)),
        Scheme(
            "q4f32_mix",
            Format(4, asymmetric=True, half=True),
            down_proj=Format(8, half=True),
            embedding=Format(8, half=True),
            half_adapters=True,
        ),
    )
}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ElastiLMError(f"unknown quantization '{name}'; valid schemes are {', '.join(SCHEMES)}")
    return SCHEMES[name]
