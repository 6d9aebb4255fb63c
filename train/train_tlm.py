"""`elastilm train-tlm`: train the TLM's two heads from the elastic LLM's own behaviour (no external labels).

1. Score head (compression). Label: a word is worth keeping when the full LLM finds it surprising. We have no
   GPT-4 compressions to imitate (LLMLingua-2's labels), so we ask our own model: a word's surprisal is the sum
   of -log p(token | everything before) over its LLM tokens, from the compiled full-width model; the words at or
   above their passage's median are labelled keep. Predictable words are the ones the LLM can restore from
   context, which is why dropping them costs least (the criterion of LLMLingua, used here as a label).
   Text: few-shot prompts built from the tune parts of every harness task (random shots) and essay chunks of the
   calibration corpus; nothing from the report parts. The backbone and head are fine-tuned with BCE per token.
2. Decision head (plan). Self-induced labels: the elastic LLM answers every tune question at every (ratio,
   level) with prompts compressed by the stage-1 TLM (evaluate/grid.py). For sampled SLOs, the label is, among
   the plans predicted to meet the SLO that still answer correctly, the one with the most capacity: the largest
   level, then the largest ratio; if no feasible plan answers correctly, the largest feasible one likewise; an
   SLO nothing meets gives no example. (Ranking by each plan's accuracy over the task's 16 tune questions was
   tried first: those accuracies differ by a few questions, and the head learned to pick the smallest plan
   almost everywhere; docs/results-slo.md has both results.) The head reads the query's [CLS] vector from the frozen
   stage-1 backbone plus the SLO fractions.

Everything is resumable: labels, the stage-1 checkpoint and the grid are files in <folder>/tlm-work/.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elastilm.compile import corpus, tlm_model
from elastilm.evaluate import grid, tasks
from elastilm.evaluate.slo import PAPER_SLOS
from elastilm.formats import tlm as tlm_file
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.compress import WORD
from elastilm.runtime_py.tlm import TLMBase
from elastilm.train import checkpoint

WORK = "tlm-work"


class TorchTLM(TLMBase):
    """The torch TLM behind the runtime's interface: used while training (labels, evaluation) and as the
    reference the compiled TLM is tested against."""

    def __init__(self, model: tlm_model.TLM, meta: dict, folder: Path | None = None):
        super().__init__(folder if folder is not None else tlm_model.backbone_folder(), meta)
        self.model = model.eval()

    @classmethod
    def from_folder(cls, folder: Path) -> TorchTLM:
        model, meta = tlm_model.load(folder)
        return cls(model, meta, Path(folder) / tlm_file.FOLDER)

    @torch.no_grad()
    def _forward(self, ids, mask, slo):
        keep, ratio, level = self.model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(slo))
        return keep.numpy()[0], ratio.numpy()[0], level.numpy()[0]


@dataclass(frozen=True)
class TLMOptions:
    layers: int = tlm_model.LAYERS
    passages_per_task: int = 24  # few-shot prompts per task for the score head
    essay_chunks: int = 40
    epochs: int = 3
    batch: int = 8
    lr: float = 5e-5
    head_lr: float = 1e-3
    grid_questions: int = 16  # tune questions per task run at every (ratio, level)
    slos_per_question: int = 24
    decision_epochs: int = 300
    seed: int = 0


# -- stage 1: score-head labels from the LLM's surprisal ---------------------------------------------------
def passages(opts: TLMOptions) -> list[str]:
    rng = random.Random(opts.seed)
    out = []
    for t in tasks.TASKS:
        pool = tasks.items(t, "tune")
        for _ in range(opts.passages_per_task):
            shots = rng.sample(pool, min(len(pool), rng.randint(2, 6)))
            out.append(
                "\n\n".join([tasks.TASKS[t][1]] + [f"{it.question}{it.options[it.answer]}" for it in shots]) + "\n\n"
            )
    words = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in corpus.split_files("calibration")).split(
        " "
    )
    for _ in range(opts.essay_chunks):
        start = rng.randrange(0, max(1, len(words) - 150))
        out.append(" ".join(words[start : start + rng.randint(60, 150)]))
    return out


def word_labels(text: str, engine) -> list[tuple[int, int, int]]:
    """(start, end, keep) per word of `text`: keep when its surprisal under the full model is >= the median."""
    enc = engine.tokenizer.encode(text, add_special_tokens=False)
    logits = torch.from_numpy(engine.score(enc.ids, 0, 1.0)[:-1])
    target = torch.tensor(enc.ids[1:])
    surprisal = np.empty(len(enc.ids))
    surprisal[1:] = (torch.logsumexp(logits, -1) - logits[torch.arange(len(target)), target]).numpy()
    surprisal[0] = surprisal[1:].max() if len(enc.ids) > 1 else 0.0
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    total = np.zeros(len(words))
    w = 0
    for (s, e), value in zip(enc.offsets, surprisal):
        while w < len(words) and words[w][1] <= s:
            w += 1
        if w < len(words) and words[w][0] < e:  # the token's first word takes it (whitespace tokens: none)
            total[w] += value
    cut = np.median(total) if len(total) else 0.0
    return [(s, e, int(v >= cut)) for (s, e), v in zip(words, total)]


def _token_targets(tlm, text: str, labels: list[tuple[int, int, int]]):
    """Per window: ids, mask, target (1/0 per real token, -1 elsewhere)."""
    out = []
    for ids, mask, spans in tlm.windows(text):
        target = np.full(ids.shape[1], -1.0, "float32")
        for k, (s, e) in enumerate(spans):
            hit = [lab for a, b, lab in labels if a < e and s < b]
            if hit:
                target[k + 1] = hit[0]
        out.append((ids[0], mask[0], target))
    return out


def train_scores(model, examples, opts: TLMOptions, progress: bool) -> list[float]:
    from tqdm import tqdm

    head = [p for n, p in model.named_parameters() if not n.startswith("bert.")]
    body = [p for n, p in model.named_parameters() if n.startswith("bert.")]
    optim = torch.optim.AdamW([{"params": body, "lr": opts.lr}, {"params": head, "lr": opts.head_lr}])
    rng = random.Random(opts.seed)
    losses = []
    steps = opts.epochs * -(-len(examples) // opts.batch)
    bar = tqdm(total=steps, desc="tlm score head", unit="step", disable=not progress)
    model.train()
    for _ in range(opts.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for b in range(0, len(order), opts.batch):
            chunk = [examples[i] for i in order[b : b + opts.batch]]
            ids = torch.from_numpy(np.stack([c[0] for c in chunk]))
            mask = torch.from_numpy(np.stack([c[1] for c in chunk]))
            target = torch.from_numpy(np.stack([c[2] for c in chunk]))
            keep, _, _ = model(ids, mask, torch.zeros(len(chunk), 2))
            valid = target >= 0
            loss = F.binary_cross_entropy_with_logits(keep[valid], target[valid])
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses


def keep_accuracy(model, examples) -> float:
    """Share of held-out words (their TLM tokens) whose keep/drop label the score head gets right."""
    right = total = 0
    with torch.no_grad():
        for ids, mask, target in examples:
            keep, _, _ = model(torch.from_numpy(ids[None]), torch.from_numpy(mask[None]), torch.zeros(1, 2))
            valid = target >= 0
            right += int(((keep[0].numpy() > 0) == (target > 0.5))[valid].sum())
            total += int(valid.sum())
    return right / max(total, 1)


# -- stage 2: self-induced decision labels ---------------------------------------------------------------
def decision_label(
    task: str,
    correct: dict[tuple, int],
    prompt_tokens: int,
    query_tokens: int,
    slo: planner.SLO,
    latency: planner.LatencyModel,
    ratios,
    levels,
    cost: planner.TLMCost,
) -> tuple[float, float] | None:
    """The self-induced (ratio, level) for one question under `slo`, or None when no plan meets it."""
    request = planner.PlanRequest(
        prompt_tokens, query_tokens, planner.budgets(slo, latency, prompt_tokens), tuple(ratios), tuple(levels), cost
    )
    feasible = [p for p in planner.candidates(request, latency, ratios, levels, cost, decides=True) if p.feasible]
    if not feasible:
        return None
    right = [p for p in feasible if correct.get((p.ratio, p.level))]
    best = max(right or feasible, key=lambda p: (p.level, p.ratio))
    return best.ratio, best.level


def sample_slos(rng: random.Random, count: int) -> list[tuple[float, float]]:
    """The paper's pairs, <1.0, 1.0> (its Rewind app: the full model's own latency), and random ones up to TPOT 1.1,
    so that budgets the full model meets occur too: with TPOT below 1.0 only, the levels whose TPOT is about the
    full model's (80-100% here) were never a label, and the head never chose them even at <1.0, 1.0>."""
    fixed = [*PAPER_SLOS, (1.0, 1.0)]
    return fixed + [(rng.uniform(0.1, 1.0), rng.uniform(0.5, 1.1)) for _ in range(count - len(fixed))]


def decision_examples(
    rows, queries: dict, latency, ratios, levels, cost, opts: TLMOptions, tokenizer_count
) -> list[tuple]:
    """(task, id, ttft, tpot, ratio index, level index) for every tune question and sampled SLO."""
    by_question: dict[tuple, dict] = {}
    tokens: dict[tuple, int] = {}
    for r in rows:
        by_question.setdefault((r["task"], r["id"]), {})[(r["ratio"], r["level"])] = r["correct"]
        tokens[(r["task"], r["id"])] = r["original"]
    rng = random.Random(opts.seed)
    out = []
    for (t, qid), correct in sorted(by_question.items()):
        q_tokens = tokenizer_count(queries[(t, qid)])
        for ttft, tpot in sample_slos(rng, opts.slos_per_question):
            label = decision_label(
                t, correct, tokens[(t, qid)], q_tokens, planner.SLO(ttft, tpot), latency, ratios, levels, cost
            )
            if label is not None:
                out.append((t, qid, ttft, tpot, ratios.index(label[0]), levels.index(label[1])))
    return out


def train_decision(model, features: dict, examples: list[tuple], opts: TLMOptions) -> list[float]:
    """Only the decision head learns; `features` maps (task, id) to the query's [CLS] vector."""
    head = list(model.decide.parameters()) + list(model.ratio.parameters()) + list(model.level.parameters())
    optim = torch.optim.AdamW(head, lr=opts.head_lr, weight_decay=1e-2)
    cls = torch.stack([features[(t, q)] for t, q, *_ in examples])
    slo = torch.tensor([[a, b] for _, _, a, b, _, _ in examples], dtype=torch.float32)
    r_target = torch.tensor([e[4] for e in examples])
    l_target = torch.tensor([e[5] for e in examples])
    losses = []
    for _ in range(opts.decision_epochs):
        z = model.decide(torch.cat([cls, slo], -1))
        loss = F.cross_entropy(model.ratio(z), r_target) + F.cross_entropy(model.level(z), l_target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss))
    return losses


def query_features(model, tlm, queries: dict) -> dict:
    out = {}
    with torch.no_grad():
        for key, text in queries.items():
            ids, mask, _ = tlm.windows(text, tlm.decide_window)[0]
            out[key] = model.encode(torch.from_numpy(ids), torch.from_numpy(mask))[0, 0]
    return out


def train_tlm(folder: Path, build: Path, opts: TLMOptions = TLMOptions(), progress: bool = True) -> Path:
    """Train the TLM of an elastified `folder` against its compiled `build` (weights, latency.json)."""
    from elastilm.runtime_py.engine import ElasticEngine

    folder, build = Path(folder), Path(build)
    latency = planner.LatencyModel.from_file(build / "latency.json")
    work = folder / WORK
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    engine = ElasticEngine(build, progress=progress)
    levels = sorted(engine.levels)
    model, meta = tlm_model.create(levels, opts.layers, seed=opts.seed)
    tlm = TorchTLM(model, meta)

    # stage 1
    stage1 = work / "score-head.safetensors"
    labels_file = work / "score-labels.json"
    texts = passages(opts)
    if labels_file.is_file() and json.loads(labels_file.read_text())["options"] == asdict(opts):
        labels = json.loads(labels_file.read_text())["labels"]
    else:
        from tqdm import tqdm

        labels = [word_labels(t, engine) for t in tqdm(texts, desc="tlm labels (LLM surprisal)", disable=not progress)]
        labels_file.write_text(json.dumps({"options": asdict(opts), "labels": labels}))
    examples = [ex for text, lab in zip(texts, labels) for ex in _token_targets(tlm, text, lab)]
    held = examples[::10]
    train = [ex for i, ex in enumerate(examples) if i % 10]
    saved = checkpoint.load(stage1) if stage1.is_file() else None
    if saved is not None and saved[1]["options"] == asdict(opts):
        state, info = saved
        model.load_state_dict(state)
        score_losses, before = info["losses"], info["before"]
    else:
        before = keep_accuracy(model, held)
        score_losses = train_scores(model, train, opts, progress)
        checkpoint.save(stage1, model.state_dict(), {"options": asdict(opts), "losses": score_losses, "before": before})
    after = keep_accuracy(model, held)

    # stage 2
    cost = tlm.measure_cost()
    rows = grid.run_grid(
        engine,
        tlm,
        list(tasks.TASKS),
        "tune",
        list(meta["ratios"]),
        levels,
        opts.grid_questions,
        work / "grid-tune.csv",
        progress,
    )
    engine.close()
    items = {(t, it.id): it.question for t in tasks.TASKS for it in grid.questions(t, "tune", opts.grid_questions)}
    count = lambda text: len(engine.tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    dec = decision_examples(rows, items, latency, list(meta["ratios"]), levels, cost, opts, count)
    if not dec:
        raise ElastiLMError("no tune question had a feasible plan under any sampled SLO; check latency.json")
    decision_losses = train_decision(model, query_features(model, tlm, items), dec, opts)

    meta["training"] = {
        "options": asdict(opts),
        "score_head": {
            "passages": len(texts),
            "windows": len(examples),
            "loss_first": score_losses[0],
            "loss_last20": float(np.mean(score_losses[-20:])),
            "heldout_keep_accuracy_before": before,
            "heldout_keep_accuracy_after": after,
        },
        "decision_head": {
            "questions": len(items),
            "examples": len(dec),
            "loss_first": decision_losses[0],
            "loss_last": decision_losses[-1],
        },
        "tlm_cost_ms_torch": asdict(cost),
        "latency_profile": str(build / "latency.json"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = tlm_model.save(model, meta, folder)
    return out


def summary(info: dict) -> str:
    """Lines for the training record of tlm.json ("training")."""
    s, d = info["score_head"], info["decision_head"]
    return (
        f"score head: {s['passages']} passages, loss {s['loss_first']:.3f} -> {s['loss_last20']:.3f}; held-out keep/drop "
        f"accuracy {s['heldout_keep_accuracy_before']:.1%} -> {s['heldout_keep_accuracy_after']:.1%}\n"
        f"decision head: {d['questions']} tune questions, {d['examples']} (question, SLO) labels, "
        f"loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}\ntime {info['seconds']:.0f}s"
    )
