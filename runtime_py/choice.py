"""Multiple choice by likelihood: which option the model finds most likely after a prompt, per character.

Used by the service (a completion request with "options") and by the accuracy harness, so both score the same
way: an option's score is its log-likelihood per character (length-normalised, as lm-eval's acc_norm).
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype("float64") - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def option_scores(
    engine, past: int, question: list[int], options: list[list[int]], level: float, chars: list[int]
) -> list[float]:
    """Per-character log-likelihood of each option (token ids) after `past` cached tokens and the question."""
    first = log_softmax(engine.prefill(question, level, past))  # predicts each option's first token
    out = []
    for ids, n in zip(options, chars):
        total = first[ids[0]]
        if len(ids) > 1:  # the option's own tokens but the last predict the rest
            rest = log_softmax(engine.score(ids[:-1], past + len(question), level))
            total += rest[np.arange(len(ids) - 1), ids[1:]].sum()
        out.append(float(total) / n)
    return out
