"""The full model's own chat answers to training prompts: the data of sequence-level self-distillation.

Served requests come in the model's chat template; essays alone never show the adapters that format. The prompts
here come only from sources no evaluation reports on: DroidTask's train instructions and the questions of the
tune parts of ARC-Easy, OpenBookQA, PIQA (goals) and SciQ (evaluate/tasks.py), taken in turn from each source.
The original checkpoint answers each one in the chat template, greedily, with transformers' `generate` and its
KV cache (the elastified model at full width computes the same function, so these are the full model's answers).
Each answer keeps its end-of-turn token, so the sub-models also learn where an answer stops. Canned answers (one
text given word for word to several prompts) are left out: see `distinct_answers`.

Cached in the elastify folder as chat-answers.jsonl, one line per prompt, written as each batch finishes: an
interrupted run resumes, and a later run with more prompts only answers the new ones.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import torch

from elastilm.compile import ingest
from elastilm.evaluate import tasks
from elastilm.formats.errors import ElastiLMError

ANSWERS = "chat-answers.jsonl"
SOURCES = ("droidtask", "arc_easy", "obqa", "piqa", "sciq")


def _question(text: str) -> str:
    """The harness's prompt of an item as a plain chat question ("Question: X\\nAnswer:" -> "X")."""
    return re.sub(r"^(Question|Instruction): |\n(Answer|App):$", "", text).strip()


def training_prompts(count: int | None) -> list[dict]:
    """`count` prompts (None: all) taken in turn from the tune parts of SOURCES (never from a report part)."""
    pools = [[(f"{s}/{it.id}", _question(it.question)) for it in tasks.items(s, "tune")] for s in SOURCES]
    out = []
    for i in range(max(len(p) for p in pools)):
        out += [{"id": p[i][0], "prompt": p[i][1]} for p in pools if i < len(p)]
    if count is None:
        return out
    if count > len(out):
        raise ElastiLMError(f"only {len(out)} training prompts exist; ask for at most that many")
    return out[:count]


def encode_chat(tokenizer, prompt: str) -> list[int]:
    """The prompt in the chat template, as the engine encodes it at serve time (plain text if it has none)."""
    if not tokenizer.chat_template:
        text = prompt
    else:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _read(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, KeyError):  # a line torn by a killed run: answered again
            continue
    return rows


@torch.no_grad()
def answers(
    folder: Path, source: str, tokenizer, count: int, max_new_tokens: int = 96, batch: int = 8, progress: bool = True
) -> list[dict]:
    """The full model's answers to the first `count` training prompts: {"id", "prompt", "ids", "answer"} with
    token ids of the prompt (chat template) and of the answer (ending with end-of-turn unless cut at the limit)."""
    from tqdm import tqdm

    path = Path(folder) / ANSWERS
    done = {k: v for k, v in _read(path).items() if v.get("max_new_tokens") == max_new_tokens}
    todo = [p for p in training_prompts(count) if p["id"] not in done]
    if todo:
        _, _, model, _ = ingest.load_hf(source)
        model.eval()
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        bar = tqdm(total=len(todo), desc="full-model chat answers", unit="answer", disable=not progress)
        with path.open("a") as f:
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                ids = [encode_chat(tokenizer, p["prompt"]) for p in chunk]
                width = max(map(len, ids))
                inputs = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding for generate
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                out = model.generate(
                    input_ids=inputs,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )[:, width:].tolist()
                for p, x, y in zip(chunk, ids, out):
                    answer = y[: y.index(eos) + 1] if eos in y else y
                    row = {**p, "max_new_tokens": max_new_tokens, "ids": x, "answer": answer}
                    done[p["id"]] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
        bar.close()
    return [done[p["id"]] for p in training_prompts(count)]


def distinct_answers(
    folder: Path, source: str, tokenizer, count: int, max_new_tokens: int = 96, progress: bool = True
) -> list[dict]:
    """`count` of the full model's answers (`answers`), without canned ones where it can. Qwen2.5-Coder answered 5
    of its first 32 training prompts with the same "I'm sorry, but I can't assist with that."; distilled on those,
    its 50% and 70% sub-models gave that reply to 12 of 60 held-out prompts, where the full model refuses 1. So
    every prompt whose answer another prompt got word for word is left out, and further prompts are answered in
    their place, up to twice `count` prompts in all; if that is not enough (a model that says one thing to
    everything), the canned answers fill the rest, with a warning."""
    top = min(2 * count, len(training_prompts(None)))
    asked = min(count, top)
    while True:
        rows = answers(folder, source, tokenizer, asked, max_new_tokens, progress=progress)
        times = Counter(tuple(r["answer"]) for r in rows)
        kept = [r for r in rows if times[tuple(r["answer"])] == 1]
        if len(kept) >= count or asked == top:
            break
        asked = min(top, asked + count - len(kept))
    if len(kept) < count:
        warnings.warn(
            f"only {len(kept)} of the full model's answers to {asked} prompts are not canned; "
            f"{count - len(kept)} canned ones fill the chat data",
            stacklevel=2,
        )
        kept += [r for r in rows if times[tuple(r["answer"])] > 1][: count - len(kept)]
    return kept[:count]
