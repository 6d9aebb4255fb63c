"""Weight quantization schemes: what a build's manifest records about its weights, named as MLC-LLM names them
(qAfB_id: A bits per weight, B bits per activation, id 1: symmetric group quantization, no zero point).

  q0f32    fp32 weights (no quantization), fp32 activations
  q4f32_1  4-bit weights, 8 per uint32; one fp32 scale per group of 32 inputs; fp32 activations
  q8f32_1  8-bit weights, 4 per uint32; likewise

Symmetric group quantization along the input (reduction) axis: scale = max|w| / qmax over a group of `group`
inputs of one output row, stored q = round(w / scale) + qmax clamped to [0, 2 qmax], read back (q - qmax) * scale
(qmax = 7 for 4 bits, as MLC-LLM's q4f32_1; 127 for 8 bits). The packed layout (compile/quantize.py) keeps both
prefixes of a level contiguous, so every active width must be a whole number of groups (`check_width`). A quantized
scheme covers every linear layer and the embedding table (the tied LM head: one 4-bit copy serves both); norms,
biases and the recovery adapters stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastilm.formats.errors import ElastiLMError


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int  # per stored weight; 32: fp32, not quantized
    group: int = 32  # inputs per scale

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    @property
    def per_word(self) -> int:
        """Weights per uint32 word."""
        return 32 // self.bits

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def check_width(self, width: int, what: str, fix: str) -> None:
        """Refuse an active width (inputs of a projection) that is not a whole number of groups."""
        if self.quantized and width % self.group:
            raise ElastiLMError(f"{what} is {width}, not a whole number of {self.name}'s groups of {self.group}; {fix}")


SCHEMES = {s.name: s for s in (Scheme("q0f32", 32, 1), Scheme("q4f32_1", 4), Scheme("q8f32_1", 8))}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ElastiLMError(f"unknown quantization '{name}'; valid schemes are {', '.join(SCHEMES)}")
    return SCHEMES[name]
