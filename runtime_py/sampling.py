"""Decoding controls: how the next token is picked from the logits, and where the text stops.

Semantics, chosen to match what users of the OpenAI API, transformers and llama.cpp expect:
- `repetition_penalty` r (transformers / llama.cpp `repeat_penalty`; 1 = off): every token already in the prompt or
  the answer has its logit divided by r when positive, multiplied by r when negative (CTRL, Keskar et al. 2019).
- `frequency_penalty` f and `presence_penalty` p (OpenAI; 0 = off, -2..2): a token that the answer (not the prompt)
  already holds c > 0 times loses c * f + p from its logit. Applied after the repetition penalty, as llama.cpp does.
- then greedy (`temperature` 0) or top-p sampling at `temperature`, seeded by `seed`;
- `stop`: up to 4 strings; the text ends before the first one that appears, which is not part of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from elastilm.formats.errors import ElastiLMError

MAX_STOP = 4  # the OpenAI API's limit


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must lie in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must lie in [-2, 2], got {self.presence_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (len(self.stop) <= MAX_STOP, f"at most {MAX_STOP} stop sequences, got {len(self.stop)}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop sequences must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ElastiLMError(message)

    def penalize(self, logits: np.ndarray, prompt: Sequence[int], answer: Sequence[int]) -> np.ndarray:
        """The logits after the repetition, frequency and presence penalties (a new array; `logits` is kept)."""
        out = np.array(logits, dtype=np.float32)
        if self.repetition_penalty != 1.0 and (len(prompt) or len(answer)):
            seen = np.unique(np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(answer, dtype=np.int64)]))
            x = out[seen]
            out[seen] = np.where(x > 0, x / self.repetition_penalty, x * self.repetition_penalty)
        if (self.frequency_penalty or self.presence_penalty) and len(answer):
            tokens, counts = np.unique(np.asarray(answer, dtype=np.int64), return_counts=True)
            out[tokens] -= counts * self.frequency_penalty + self.presence_penalty
        return out

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = (logits - logits.max()) / self.temperature
        p = np.exp(z) / np.exp(z).sum()
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p) + 1)]
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty or self.presence_penalty)


GREEDY = Sampling()


def until_stop(texts: Iterator[str], stop: Sequence[str]) -> Iterator[str]:
    """The growing decoded text `texts` (each item the whole text so far) as new pieces, cut before the first stop
    sequence. Text that could still become a stop sequence is held back until it cannot. Returns (as the
    generator's value) True when a stop sequence ended the text."""
    shown = 0
    text = ""
    for text in texts:
        hits = [i for i in (text.find(s, shown) for s in stop) if i >= 0]  # held-back text: none starts before
        if hits:
            cut = min(hits)
            if cut > shown:
                yield text[shown:cut]
            return True
        # the longest end of the text that begins a stop sequence waits for the next token
        held = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - held
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if len(text) > shown:
        yield text[shown:]
    return False
