"""Prompt compression with the TLM's score head: drop the least useful tokens of the compressible parts.

The prompt is a list of parts; parts marked `compress=False` (the user's query) are kept whole and the ratio is
over the whole prompt, as in the paper: a prompt of N LLM tokens at ratio r keeps round(r * N) tokens, the
query's among them. The TLM and the LLM tokenize differently, so scores travel through text, never token ids:
each TLM token's keep probability is spread over the words (whitespace-separated spans) it overlaps, a word's
score is the mean over its TLM tokens, and each LLM token takes the score of the word it lies in (the best one
if it spans several; a whitespace token, the score of the word after it). The kept LLM tokens are the top ones by score,
ties to the earlier token, so the budget is met exactly and whole words go together except at the margin.
Forced tokens (any text in `force`, and digits when no question is given) score above everything and go first.

Given the user's question, the compression is question-aware, a lexical form of LongLLMLingua's coarse step: each
sentence of the context gains one point per question term it holds (a term is a Porter-stemmed question word of
three or more letters; a term found in more than half of the sentences, like "the", counts for none), so the
sentences that share the question's words go before every other one and the TLM's scores (keep probabilities,
below one) order the tokens within each tier. A context sentence saying which bag to take survives a ratio that
would drop it for "Which bag should I take?". The question's sentences then bring their own numbers: forcing every
digit of a context that holds seven clock times keeps all seven and drops the words that tell them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from nltk.stem import PorterStemmer  # imported with the module: its 0.2 s is not the first request's

# raised whenever the same prompt and ratio would keep other tokens: grids of answers record it (evaluate/grid.py)
VERSION = 2  # 2: question-aware, digits forced only without a question
WORD = re.compile(r"\S+")
DIGIT = re.compile(r"\d")
TERM = re.compile(r"[A-Za-z]{3,}")
# a sentence ends at . ! or ? followed by whitespace, or at a blank line (hard-wrapped lines stay one sentence)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
STEM = PorterStemmer().stem


class Recency:
    """Scores in place of the TLM's score head (its ablation, the "no-score-head" strategy): each word scores by
    its position, so compression keeps the end of the context, as plain truncation from the front would."""

    def token_scores(self, text: str) -> list[tuple[int, int, float]]:
        words = [m.span() for m in WORD.finditer(text)]
        return [(a, b, (i + 1) / len(words)) for i, (a, b) in enumerate(words)]


@dataclass(frozen=True)
class Part:
    text: str
    compress: bool = True  # False: kept whole (the user's query)


@dataclass(frozen=True)
class Compressed:
    ids: list[int]  # LLM token ids of the compressed prompt, parts in order
    original: int  # LLM tokens before
    requested: int  # round(ratio * original)
    achieved: int  # len(ids): equals `requested` unless the kept parts alone are longer

    @property
    def ratio(self) -> float:
        return self.achieved / self.original if self.original else 1.0


def word_scores(text: str, token_scores: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """(start, end, score) of each word of `text`: the mean keep probability of the TLM tokens overlapping it."""
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    starts = np.array([s for s, _, _ in token_scores])
    ends = np.array([e for _, e, _ in token_scores])
    probs = np.array([p for _, _, p in token_scores])
    out = []
    for s, e in words:
        hit = (starts < e) & (ends > s)
        out.append((s, e, float(probs[hit].mean()) if hit.any() else 0.0))
    return out


def llm_token_scores(text: str, offsets: list[tuple[int, int]], words: list[tuple[int, int, float]]) -> np.ndarray:
    """Score of each LLM token (character span in `offsets`): the best word it overlaps; a whitespace token
    (a line break) scores like the word after it, so a kept line keeps its break; trailing ones score -1."""
    scores = np.full(len(offsets), -1.0)
    w = 0
    for i, (s, e) in enumerate(offsets):
        while w < len(words) and words[w][1] <= s:
            w += 1
        j = w
        while j < len(words) and words[j][0] < e:
            scores[i] = max(scores[i], words[j][2])
            j += 1
        if j == w and w < len(words):  # no word inside: whitespace before words[w]
            scores[i] = words[w][2]
    return scores


def forced(text: str, offsets: list[tuple[int, int]], keep_digits: bool, force: tuple[str, ...]) -> np.ndarray:
    """Which LLM tokens must stay: those with a digit (keep_digits) or inside an occurrence of a `force` string."""
    out = np.zeros(len(offsets), bool)
    spans = [(m.start(), m.end()) for f in force for m in re.finditer(re.escape(f), text)] if force else []
    for i, (s, e) in enumerate(offsets):
        piece = text[s:e]
        out[i] = (keep_digits and DIGIT.search(piece) is not None) or any(a < e and s < b for a, b in spans)
    return out


def sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (SENTENCE_END), blank ones left out."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text + "\n\n"):
        if text[start : m.start()].strip():
            out.append((start, m.start()))
        start = m.end()
    return out


def terms(text: str) -> set[str]:
    """The stemmed words of three or more letters in `text`."""
    return {STEM(w.lower()) for w in TERM.findall(text)}


def relevance(text: str, question: str) -> list[tuple[int, int, float]]:
    """(start, end, points) of each sentence of `text`: how many of the question's terms it holds, leaving out
    terms that more than half of the sentences hold."""
    spans = sentences(text)
    held = [terms(text[a:b]) for a, b in spans]
    asked = terms(question)
    common = {t for t in asked if sum(t in h for h in held) > max(1, len(spans) // 2)}
    return [(a, b, float(len(h & (asked - common)))) for (a, b), h in zip(spans, held)]


def select(scores: np.ndarray, must: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of the `keep` best tokens: forced ones first, then by score, ties to the earlier."""
    key = np.where(must, np.inf, scores)
    order = sorted(range(len(key)), key=lambda i: (-key[i], i))
    return np.sort(np.array(order[:keep], dtype=int))


def compress(
    parts: list[Part],
    ratio: float,
    tlm,
    tokenizer,
    keep_digits: bool | None = None,
    force: tuple[str, ...] = (),
    question: str = "",
) -> Compressed:
    """Compress `parts` to `ratio` of their LLM tokens. `tlm`: a runtime.tlm.TLMBase (token_scores);
    `tokenizer`: the LLM's `tokenizers.Tokenizer`; `question`: the user's question, whose words lift the context
    sentences that hold them (empty: the TLM's scores alone); `keep_digits`: force every token with a digit
    (None: only without a question)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    encoded = [tokenizer.encode(p.text, add_special_tokens=False) for p in parts]
    original = sum(len(e.ids) for e in encoded)
    requested = round(ratio * original)
    fixed = sum(len(e.ids) for p, e in zip(parts, encoded) if not p.compress)
    free = [(p, e) for p, e in zip(parts, encoded) if p.compress]
    budget = max(0, requested - fixed)
    if budget >= sum(len(e.ids) for _, e in free):
        return Compressed([i for e in encoded for i in e.ids], original, requested, original)
    if keep_digits is None:
        keep_digits = not question
    # one selection over all compressible parts, so the budget goes where the scores are highest
    scores, must, owner = [], [], []
    for k, (p, e) in enumerate(free):
        words = word_scores(p.text, tlm.token_scores(p.text)) if p.text.strip() else []
        score = llm_token_scores(p.text, e.offsets, words)
        if question:
            score += np.maximum(llm_token_scores(p.text, e.offsets, relevance(p.text, question)), 0)
        scores.append(score)
        must.append(forced(p.text, e.offsets, keep_digits, force))
        owner += [(k, j) for j in range(len(e.ids))]
    kept = select(np.concatenate(scores), np.concatenate(must), budget)
    keep_sets: dict[int, list[int]] = {}
    for i in kept:
        k, j = owner[i]
        keep_sets.setdefault(k, []).append(j)
    ids, k = [], 0
    for p, e in zip(parts, encoded):
        if p.compress:
            ids += [e.ids[j] for j in keep_sets.get(k, [])]
            k += 1
        else:
            ids += e.ids
    return Compressed(ids, original, requested, len(ids))
