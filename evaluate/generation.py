"""Generation quality per level: free-text answers to held-out chat prompts, measured against the full model.

Multiple-choice likelihoods (the accuracy harness) hide what a reader of free text sees: loops and noise. Each
level answers the prompts of data/chat/heldout.jsonl (or tune.jsonl, for decisions) through the compiled engine, greedily, 64 tokens, no
penalties (the measure is of the sub-model, not of the decoding controls), and per level we report:
- rep4: the repeated-4-gram rate, token 4-grams that already occurred earlier in the same answer, pooled over
  the answers (a loop drives it towards 1);
- nll_full: the full model's mean NLL per token of the level's answers, pooled over tokens: how plausible the
  full model finds them (the full model's own greedy answers give the floor, nll_ratio = 1);
- rouge_l: ROUGE-L F1 (the `rouge-score` package) of the level's answer against the full model's answer to the
  same prompt, averaged over prompts.
Results go to a folder: answers.csv (one row per variant, level and prompt; a rerun skips what is there, so runs
resume), generation.csv/.md/.png and samples.md (a few answers per level).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from elastilm.formats import build as build_file
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.files import resumable_rows
from elastilm.runtime_py.choice import log_softmax

CHAT = Path(__file__).resolve().parents[1] / "data" / "chat"  # SOURCE.md there
PROMPTS = CHAT / "heldout.jsonl"  # report only
PROMPT_SETS = {"heldout": PROMPTS, "tune": CHAT / "tune.jsonl"}  # tune: for decisions, never reported
VARIANTS = {"adapters": "with recovery adapters", "no-adapters": "plain sub-models"}
# build: formats/build.build_id of the build that answered (rows of another build are not reused)
ANSWER_FIELDS = ("variant", "level", "id", "tokens", "repeats", "ngrams", "nll_sum", "answer_ids", "text", "build")
COLUMNS = ("variant", "level", "answers", "tokens", "rep4", "nll_full", "nll_ratio", "rouge_l")
PLOTTED = ("level", "rep4", "nll_ratio", "rouge_l")  # x, then the three panels


def prompts(limit: int | None = None, path: Path = PROMPTS) -> list[dict]:
    """The first `limit` prompts of a JSON-lines file of {"id", "prompt"}."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ElastiLMError(f"{path}: not a JSON-lines file of prompts ({e})") from None
    if not rows or not all(isinstance(r, dict) and {"id", "prompt"} <= set(r) for r in rows):
        raise ElastiLMError(f'{path}: every line must be an object with "id" and "prompt"')
    return rows[:limit]


def repeats(ids: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that occurred earlier in `ids`, n-grams in `ids`)."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i : i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated, max(len(ids) - n + 1, 0)


def answer_nll(engine, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """The full model's summed NLL of `answer_ids` after `prompt_ids` (one scoring pass over both)."""
    if not answer_ids:
        return 0.0
    logits = engine.score(prompt_ids + answer_ids, 0, 1.0)[len(prompt_ids) - 1 : -1]
    logp = log_softmax(logits)
    return float(-logp[np.arange(len(answer_ids)), answer_ids].sum())


def _done(path: Path, build: str) -> dict:
    """{(variant, level, id): row} of the answers `build` (its build_id) gave."""
    return {
        (r["variant"], float(r["level"]), r["id"]): r
        for r in resumable_rows(path, ANSWER_FIELDS)
        if r["build"] == build
    }


def run(
    build: Path,
    out: Path,
    levels: list[float],
    variants: list[str] = ("adapters",),
    limit: int | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
    prompts_file: Path = PROMPTS,
) -> list[dict]:
    """Answer every (variant, level, prompt) not yet in out/answers.csv; returns the per-level rows (also written)."""
    from elastilm.runtime_py.engine import ElasticEngine

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ElastiLMError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "adapters" in variants and not build_file.read_manifest(build, verify=False).get("adapter_levels"):
        raise ElastiLMError(
            f"{build} has no recovery adapters, so the 'adapters' variant would measure the plain sub-models under "
            "its name; use --variants no-adapters, or run elastilm recover and compile again"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "answers.csv"
    build_hash = build_file.build_id(build)
    done = _done(path, build_hash)
    items = prompts(limit, prompts_file)
    todo = [(v, lv, p) for v in variants for lv in levels for p in items if (v, lv, p["id"]) not in done]
    new_file = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, ANSWER_FIELDS)
        if new_file:
            writer.writeheader()
        engines: dict[str, ElasticEngine] = {}
        for variant, level, item in tqdm(todo, desc="answers per level", unit="answer", disable=not progress):
            if variant not in engines:
                engines[variant] = ElasticEngine(build, adapters=variant == "adapters")
            engine = engines[variant]  # also the judge: level 1.0 runs no adapter in either variant
            prompt_ids = engine.encode(engine.chat_prompt(item["prompt"]))
            ids = list(engine.generate_ids(prompt_ids, level, max_new_tokens))
            ids = ids[:-1] if ids and ids[-1] == engine.eos_id else ids
            rep, grams = repeats(ids)
            writer.writerow(
                {
                    "variant": variant,
                    "level": level,
                    "id": item["id"],
                    "tokens": len(ids),
                    "repeats": rep,
                    "ngrams": grams,
                    "nll_sum": round(answer_nll(engine, prompt_ids, ids), 4),
                    "answer_ids": " ".join(map(str, ids)),
                    "text": engine.tokenizer.decode(ids),
                    "build": build_hash,
                }
            )
            f.flush()
        for engine in engines.values():
            engine.close()
    return summarize(out, [p["id"] for p in items], variants, levels, build_hash)


def summarize(out: Path, ids: list[str], variants: list[str], levels: list[float], build: str) -> list[dict]:
    """Per-level rows from the answers of `build` (its build_id) in out/answers.csv, written as
    generation.csv/.md/.png and samples.md."""
    from rouge_score import rouge_scorer

    answers = _done(Path(out) / "answers.csv", build)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = []
    for variant in variants:
        full = {i: answers[(variant, 1.0, i)] for i in ids if (variant, 1.0, i) in answers}
        floor = None
        for level in sorted(levels, reverse=True):
            got = [answers[(variant, level, i)] for i in ids if (variant, level, i) in answers]
            if not got:
                continue
            tokens = sum(int(r["tokens"]) for r in got)
            nll = sum(float(r["nll_sum"]) for r in got) / max(tokens, 1)
            floor = nll if level == 1.0 else floor
            rouge = [scorer.score(full[r["id"]]["text"], r["text"])["rougeL"].fmeasure for r in got if r["id"] in full]
            rows.append(
                {
                    "variant": variant,
                    "level": level,
                    "answers": len(got),
                    "tokens": tokens,
                    "rep4": sum(int(r["repeats"]) for r in got) / max(sum(int(r["ngrams"]) for r in got), 1),
                    "nll_full": nll,
                    "nll_ratio": nll / floor if floor else None,
                    "rouge_l": float(np.mean(rouge)) if rouge else None,
                }
            )
    _write(Path(out), rows, answers, ids)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | level | answers | tokens | repeated 4-grams | full-model NLL/token | NLL vs full's answers | ROUGE-L vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "" if r["nll_ratio"] is None else f"{r['nll_ratio']:.2f}x"
        rouge = "" if r["rouge_l"] is None else f"{r['rouge_l']:.3f}"
        lines.append(
            f"| {r['variant']} | {r['level']:.0%} | {r['answers']} | {r['tokens']} | {r['rep4']:.1%} | "
            f"{r['nll_full']:.3f} | {ratio} | {rouge} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, rows: list[dict], answers: dict, ids: list[str], samples: int = 2) -> None:
    with (out / "generation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "generation.md").write_text(markdown(rows))
    lines = []
    for i in ids[:samples]:
        lines.append(f"## {i}\n")
        for (variant, level, rid), r in sorted(answers.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            if rid == i:
                text = r["text"].replace("\n", " ")
                lines.append(f"- **{variant} {level:.0%}**: {text}")
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines))
    _plot(
        {VARIANTS[v]: [r for r in rows if r["variant"] == v] for v in dict.fromkeys(r["variant"] for r in rows)},
        out / "generation.png",
    )


def compare(runs: dict[str, Path], path: Path) -> None:
    """One PNG of several runs' generation.csv (label -> output folder), e.g. before and after a recovery recipe."""
    series = {}
    for label, folder in runs.items():
        with (Path(folder) / "generation.csv").open(newline="") as f:
            series[label] = [
                {k: float(v) if v else None for k, v in r.items() if k in PLOTTED} for r in csv.DictReader(f)
            ]
    _plot(series, path)


def _plot(series: dict[str, list[dict]], path: Path) -> None:
    """The three measures against the level, one line per label (rows as in generation.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for label, rows in series.items():
        x = [r["level"] * 100 for r in rows]
        for ax, key, scale in zip(axes, PLOTTED[1:], (100, 1, 1)):
            ax.plot(x, [r[key] * scale if r[key] is not None else np.nan for r in rows], "o-", label=label)
    titles = ["repeated 4-grams (%)", "full-model NLL of the answers (x full's own)", "ROUGE-L vs the full model"]
    for ax, title in zip(axes, titles):
        ax.set_xlabel("level (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
