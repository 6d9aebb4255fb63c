"""The demo's trip notes, compressed with and without the question: which answers survive each prompt ratio.

    python benchmarks/notes_questions.py dist/smollm2-135m/host-cpu --level 1.0 --out dist/notes-questions

Six questions about data/demo/trip-notes.txt, each answered (greedy, 32 tokens) after the notes compressed to every
ratio the build's TLM plans, by the TLM's scores alone (digits forced, as compression was before it read the
question) and question-aware (runtime_py/compress.py). An answer counts as right when it holds the fact's words.
The notes and questions are the demo's, not a reported benchmark: the table says what a user of the demo sees.
"""

from __future__ import annotations

import argparse
from pathlib import Path

QUESTIONS = {  # question -> words the right answer holds
    "Which bag should I take?": "small blue",
    "What time does the train to Lakeside leave on Friday?": "17:40",
    "Where does the boat tour start?": "north pier",
    "What is the name on the dinner booking?": "Rivera",
    "What time is dinner booked at the Harbour Kitchen?": "20:00",
    "When does the hotel sauna close?": "22:00",
}
HOW = ("TLM scores, digits forced", "question-aware")


def main() -> None:
    from elastilm.runtime_py.compress import compress
    from elastilm.runtime_py.orchestrator import Orchestrator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--level", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="folder for notes-questions.md and .png")
    parser.add_argument("--notes", type=Path, default=Path(__file__).parents[1] / "data/demo/trip-notes.txt")
    args = parser.parse_args()
    orch = Orchestrator(args.build)
    engine, notes = orch.engine, args.notes.read_text()
    rows = []
    for question, fact in QUESTIONS.items():
        parts = orch.parts(question, notes)
        for ratio in orch.tlm.ratios:
            for how, asked in zip(HOW, ("", question)):  # no question: digits forced, as compress() does then
                c = compress(parts, ratio, orch.tlm, engine.tokenizer, question=asked)
                answer = engine.tokenizer.decode(list(engine.generate_ids(c.ids, args.level, 32)))
                rows.append((question, ratio, how, fact in answer, answer.split("\n")[0][:90]))
    table = [f"| question | ratio | compression | right | answer at level {args.level:g} |", "|---|---|---|---|---|"]
    table += [f"| {q} | {r:g} | {how} | {'yes' if ok else 'no'} | {a} |" for q, r, how, ok, a in rows]
    right = {how: [sum(ok for _, rr, h, ok, _ in rows if rr == r and h == how) for r in orch.tlm.ratios] for how in HOW}
    table += [""] + [
        f"{how}: right answers out of {len(QUESTIONS)} by ratio: "
        + ", ".join(f"{r:g}: {n}" for r, n in zip(orch.tlm.ratios, counts))
        for how, counts in right.items()
    ]
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "notes-questions.md").write_text("\n".join(table) + "\n")
        plot(right, orch.tlm.ratios, len(QUESTIONS), args.out / "notes-questions.png")
        print(f"wrote {args.out}/notes-questions.md and .png")


def plot(right: dict[str, list[int]], ratios, total: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(ratios))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (how, counts) in enumerate(right.items()):
        ax.bar(x + (i - 0.5) * 0.4, counts, 0.4, label=how)
    ax.set_xticks(x, [f"{r:g}" for r in ratios])
    ax.set_xlabel("prompt ratio")
    ax.set_ylabel(f"right answers (of {total})")
    ax.set_ylim(0, total)
    ax.set_title("Trip-notes questions, full width")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
