"""Decoding controls against a hand computation and transformers' logits processors (no TVM here)."""

from collections import Counter

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.sampling import Sampling, until_stop


def test_penalties_match_a_hand_computation():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0], dtype=np.float32)
    s = Sampling(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = s.penalize(logits, prompt=[0, 1], answer=[3, 3, 2])
    # repetition over prompt + answer: 2/2, -1*2, 0.5/2, 3/2, untouched;
    # then the answer's counts: token 3 twice (-2*0.5 - 0.25), token 2 once (-0.5 - 0.25)
    assert got.tolist() == [1.0, -2.0, -0.5, 0.25, -2.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # the input stays as it was


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.5])
def test_repetition_penalty_equals_transformers(penalty):
    rng = np.random.default_rng(int(penalty * 10))
    logits = rng.normal(0, 3, 301).astype(np.float32)
    prompt, answer = rng.integers(0, 301, 17).tolist(), rng.integers(0, 301, 9).tolist()
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + answer]), torch.tensor(logits[None]))[0]
    got = Sampling(repetition_penalty=penalty).penalize(logits, prompt, answer)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert not np.allclose(got, logits)


def test_frequency_and_presence_count_the_answer_only():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, 50).astype(np.float32)
    prompt, answer = [1, 2, 3, 4], [5, 5, 5, 2, 7, 7]
    got = Sampling(frequency_penalty=0.3, presence_penalty=-0.4).penalize(logits, prompt, answer)
    want = logits.copy()
    for token, count in Counter(answer).items():  # OpenAI's formula, token by token
        want[token] -= count * 0.3 + (-0.4)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == logits[1] and got[2] != logits[2]  # prompt-only token 1 untouched


def test_off_by_default_and_greedy_pick():
    logits = np.array([0.1, 0.9, -0.3], dtype=np.float32)
    s = Sampling()
    assert not s.penalized
    assert s.penalize(logits, [1], [1, 1]).tolist() == logits.tolist()
    assert s.pick(logits, np.random.default_rng(0)) == 1


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty must lie in \\[-2, 2\\]"),
        ({"presence_penalty": -3}, "presence_penalty must lie in \\[-2, 2\\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"stop": ("a", "b", "c", "d", "e")}, "at most 4 stop sequences"),
        ({"stop": ("",)}, "non-empty strings"),
        ({"top_p": 0}, "top_p must lie in"),
    ],
)
def test_bad_controls_are_refused(fields, message):
    with pytest.raises(ElastiLMError, match=message):
        Sampling(**fields)


def _grow(pieces):
    """The running text after each token's piece, as the engine's detokenizer yields it."""
    text = ""
    for p in pieces:
        text += p
        yield text


def _run(pieces, stop):
    gen = until_stop(_grow(pieces), stop)
    out = []
    try:
        while True:
            out.append(next(gen))
    except StopIteration as end:
        return out, end.value


def test_stop_sequence_across_tokens_is_cut_and_never_shown():
    out, stopped = _run(["Hello", " wor", "ld.", " Us", "er:", " more"], ["User:"])
    assert "".join(out) == "Hello world. " and stopped
    assert all("U" not in p for p in out)  # " Us" was held back, never sent and taken back


def test_held_back_text_is_released_when_it_is_not_a_stop():
    out, stopped = _run(["a", "b", "#", "#", "c"], ["###"])
    assert "".join(out) == "ab##c" and not stopped
    assert out[:2] == ["a", "b"]  # shown as soon as no stop can begin there
    out, stopped = _run(["x", "#", "#"], ["###"])
    assert "".join(out) == "x##" and not stopped  # the end of the answer releases what was held


def test_earliest_of_several_stops_wins_and_no_stop_passes_through():
    out, stopped = _run(["one. two", "\n\nthree END"], ["END", "\n\n"])
    assert "".join(out) == "one. two" and stopped
    assert _run(["abc", "def"], []) == (["abc", "def"], False)
