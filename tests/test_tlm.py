"""The TLM: compression exactness on real prompts, score mapping, TVM-vs-torch parity, labels, orchestration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_tlm, tiny_build_with_tlm

from elastilm.compile import tlm_model
from elastilm.evaluate import tasks
from elastilm.formats import tlm as tlm_file
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import planner
from elastilm.runtime_py.compress import WORD, Part, compress, relevance
from elastilm.train import train_tlm

LEVELS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.fixture(scope="module")
def llm_tokenizer():
    from transformers import AutoTokenizer

    from elastilm.compile.ingest import resolve

    _, path = resolve("smollm2-135m")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer


@pytest.fixture(scope="module")
def torch_tlm():
    model, meta = small_tlm(LEVELS)
    return train_tlm.TorchTLM(model, meta)


def real_prompts():
    """Each task's 5-shot prefix with two report questions, as (prefix, question)."""
    return [(tasks.fewshot_prefix(t), it.question) for t in tasks.TASKS for it in tasks.items(t, "report")[:2]]


@pytest.mark.parametrize("ratio", [0.9, 0.77, 0.5, 0.33, 0.2, 0.1, 0.03])
def test_budget_met_exactly_and_query_untouched_on_real_prompts(ratio, llm_tokenizer, torch_tlm):
    for prefix, question in real_prompts():
        p_ids = llm_tokenizer.encode(prefix, add_special_tokens=False).ids
        q_ids = llm_tokenizer.encode(question, add_special_tokens=False).ids
        c = compress([Part(prefix), Part(question, compress=False)], ratio, torch_tlm, llm_tokenizer)
        assert c.original == len(p_ids) + len(q_ids)
        assert c.requested == round(ratio * c.original)
        assert c.achieved == len(c.ids) == max(c.requested, len(q_ids))
        assert c.ids[len(c.ids) - len(q_ids) :] == q_ids  # the query, whole and last
        kept = iter(p_ids)  # the kept context is an in-order subsequence of the original
        assert all(any(t == u for u in kept) for t in c.ids[: len(c.ids) - len(q_ids)])


class WordLengthScores:
    """A stand-in score head with a known answer: every TLM token scores len(its word) / 100."""

    def token_scores(self, text):
        return [(m.start(), m.end(), len(m.group()) / 100) for m in WORD.finditer(text)]


def test_kept_tokens_are_the_best_scored_words(llm_tokenizer):
    """Checked against the score each token should get from its word's text, computed here independently:
    no dropped in-word token outscores a kept one."""
    prefix, question = real_prompts()[0]
    enc = llm_tokenizer.encode(prefix, add_special_tokens=False)
    word_len = np.zeros(len(prefix))
    for m in WORD.finditer(prefix):
        word_len[m.start() : m.end()] = len(m.group())
    expected = np.array([word_len[s:e].max() / 100 for s, e in enc.offsets])
    for ratio in (0.8, 0.5, 0.25):
        c = compress(
            [Part(prefix), Part(question, compress=False)], ratio, WordLengthScores(), llm_tokenizer, keep_digits=False
        )
        kept_ids = c.ids[: len(c.ids) - len(llm_tokenizer.encode(question, add_special_tokens=False).ids)]
        # recover which positions were kept: the selection keeps order, so walk the original
        kept, j = np.zeros(len(enc.ids), bool), 0
        for i, t in enumerate(enc.ids):
            if j < len(kept_ids) and kept_ids[j] == t:
                kept[i], j = True, j + 1
        inside = expected > 0
        assert kept.sum() == len(kept_ids)
        assert expected[kept & inside].min() >= expected[~kept & inside].max()


@pytest.mark.parametrize("ratio", [0.9, 0.55, 0.3])
def test_recency_scores_keep_the_end_of_the_context(ratio, llm_tokenizer):
    """The score head's ablation: with digits not forced, the kept context tokens are its last ones, but for the
    word at the margin (its line break and first tokens go first: ties go to the earlier token)."""
    from elastilm.runtime_py.compress import Recency

    prefix, question = real_prompts()[1]
    enc = llm_tokenizer.encode(prefix.rstrip(), add_special_tokens=False).ids  # trailing line breaks go first
    q = llm_tokenizer.encode(question, add_special_tokens=False).ids
    c = compress([Part(prefix), Part(question, compress=False)], ratio, Recency(), llm_tokenizer, keep_digits=False)
    kept = c.ids[: len(c.ids) - len(q)]
    assert c.achieved == c.requested and c.ids[len(kept) :] == q and 0 < len(kept) < len(enc)
    tail = len(kept) - 4
    assert kept[-tail:] == enc[-tail:]


def test_digits_and_forced_text_stay(llm_tokenizer, torch_tlm):
    context = "Order 4512 shipped on day 17. The parcel weighs 3 kg. Answer: call the courier before noon. " * 3
    enc = llm_tokenizer.encode(context, add_special_tokens=False)
    digit_tokens = [t for t, (s, e) in zip(enc.ids, enc.offsets) if any(ch.isdigit() for ch in context[s:e])]
    c = compress([Part(context), Part("When?", compress=False)], 0.5, torch_tlm, llm_tokenizer, force=("Answer:",))
    kept = llm_tokenizer.decode(c.ids)
    assert c.achieved == c.requested
    assert sorted(t for t in c.ids if t in set(digit_tokens)) == sorted(digit_tokens)
    assert kept.count("Answer:") == 3 and kept.count("4512") == 3
    plain = compress([Part(context), Part("When?", compress=False)], 0.2, torch_tlm, llm_tokenizer, keep_digits=False)
    assert plain.achieved == plain.requested  # forced tokens are never a reason to miss the budget


def test_sentence_relevance_counts_the_questions_terms_by_hand():
    """Terms are stemmed ("dogs" is "dog"); "the" is in 3 of 4 sentences, more than half, so it counts for none;
    "saw" is in none; a blank line ends a sentence, a single line break does not."""
    text = "The cat sat. The dogs\nbarked at the cat! A dog ran.\n\nThe end"
    points = relevance(text, "Which dog saw the cat?")
    assert [text[a:b] for a, b, _ in points] == [
        "The cat sat.",
        "The dogs\nbarked at the cat!",
        "A dog ran.",
        "The end",
    ]
    assert [p for _, _, p in points] == [1.0, 2.0, 1.0, 0.0]


class LowOn:
    """Scores 0.9 for every word but those of `sentence`, 0.01 there: the TLM alone drops that sentence first."""

    def __init__(self, text, sentence):
        self.a = text.index(sentence)
        self.b = self.a + len(sentence)

    def token_scores(self, text):
        return [(m.start(), m.end(), 0.01 if self.a <= m.start() < self.b else 0.9) for m in WORD.finditer(text)]


@pytest.mark.parametrize("ratio", [0.6, 0.3])
def test_the_question_keeps_the_sentence_that_answers_it(ratio, llm_tokenizer):
    """The demo's trip notes: the sentence on which bag to take scores lowest, so the TLM's scores alone drop it;
    with the question it is kept word for word, the budget is still met exactly and the query stays whole."""
    context = (Path(__file__).parents[1] / "data/demo/trip-notes.txt").read_text()
    answer = "Take the small blue bag, not the big suitcase, because"
    question = "Which bag should I take?"
    parts = [Part(context), Part(question, compress=False)]
    scorer = LowOn(context, answer)
    q = llm_tokenizer.encode(question, add_special_tokens=False).ids
    plain = compress(parts, ratio, scorer, llm_tokenizer)
    aware = compress(parts, ratio, scorer, llm_tokenizer, question=question)
    assert "small blue" not in llm_tokenizer.decode(plain.ids)
    assert answer in llm_tokenizer.decode(aware.ids)
    assert aware.achieved == aware.requested == plain.achieved and aware.ids[-len(q) :] == q


def test_a_question_keeps_its_sentences_numbers_not_every_number(llm_tokenizer):
    """Without a question every clock time of the notes is forced in; with one, the times of the sentences that
    share no term with it go (the train home at 16:15) and the question's sentence stays whole."""
    context = (Path(__file__).parents[1] / "data/demo/trip-notes.txt").read_text()
    question = "When does the boat tour start?"
    parts = [Part(context), Part(question, compress=False)]
    scorer = LowOn(context, "The boat tour starts at 11:00 at the north pier")
    plain = llm_tokenizer.decode(compress(parts, 0.3, scorer, llm_tokenizer).ids)
    aware = llm_tokenizer.decode(compress(parts, 0.3, scorer, llm_tokenizer, question=question).ids)
    assert "1615" in plain.replace(":", "") and "1615" not in aware.replace(":", "")
    assert "The boat tour starts at 11:00 at the north pier" in aware


def test_no_compressible_text_or_ratio_one_keeps_everything(llm_tokenizer, torch_tlm):
    parts = [Part("Some context here."), Part("The question?", compress=False)]
    ids = [i for p in parts for i in llm_tokenizer.encode(p.text, add_special_tokens=False).ids]
    assert compress(parts, 1.0, torch_tlm, llm_tokenizer).ids == ids
    only_query = compress([Part("The question?", compress=False)], 0.3, torch_tlm, llm_tokenizer)
    assert only_query.ids == llm_tokenizer.encode("The question?", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="ratio"):
        compress(parts, 0.0, torch_tlm, llm_tokenizer)


def test_long_text_is_scored_in_windows_covering_every_token(torch_tlm):
    text = " ".join(f"word{i}" for i in range(400))
    spans = [(s, e) for s, e, _ in torch_tlm.token_scores(text)]
    enc = torch_tlm.tokenizer.encode(text, add_special_tokens=False)
    assert spans == list(enc.offsets) and len(spans) > 2 * torch_tlm.window


def test_compiled_tlm_equals_torch_tlm(tmp_path, torch_tlm):
    """The TVM build of the TLM (host CPU) against the torch model: score head on several windows (one padded),
    decision head under several SLOs."""
    from elastilm.compile.build_tlm import build_tlm
    from elastilm.runtime_py.tlm import CompiledTLM
    from elastilm.targets import preset

    model, meta = small_tlm(LEVELS, layers=2, seed=3)
    tlm_model.save(model, meta, tmp_path / "elastic")
    out = build_tlm(tmp_path / "elastic", preset("host-cpu"), tmp_path / "build")
    compiled = CompiledTLM(out)
    reference = train_tlm.TorchTLM(model, meta)
    text = " ".join(p for p, _ in real_prompts()[:3])
    for ids, mask, _ in reference.windows(text)[:3]:
        for slo in (np.zeros((1, 2), "float32"), np.array([[0.4, 0.7]], "float32")):
            got, want = compiled._forward(ids, mask, slo), reference._forward(ids, mask, slo)
            real = mask[0].astype(bool)
            np.testing.assert_allclose(got[0][real], want[0][real], atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(got[1], want[1], atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(got[2], want[2], atol=2e-4, rtol=1e-4)
    a, b = compiled.decide(real_prompts()[5][1], 0.2, 0.6), reference.decide(real_prompts()[5][1], 0.2, 0.6)
    assert int(np.argmax(a[0])) == int(np.argmax(b[0])) and int(np.argmax(a[1])) == int(np.argmax(b[1]))
    np.testing.assert_allclose(
        [p for *_, p in compiled.token_scores(text)], [p for *_, p in reference.token_scores(text)], atol=1e-4
    )
    assert compiled.measure_cost(repeat=1).window_ms > 0

    # a changed weight file is refused before anything runs, in the trained folder and in the build
    weights = tmp_path / "elastic" / "tlm" / tlm_file.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ElastiLMError, match="checksum"):
        tlm_model.load(tmp_path / "elastic")
    lib = out / "params" / "tensor-cache.json"
    lib.write_text(lib.read_text() + " ")
    with pytest.raises(ElastiLMError):
        CompiledTLM(out)


class FakeEngine:
    """Logits chosen so each token's surprisal is known: token t costs `cost[t]` nats after anything."""

    def __init__(self, tokenizer, cost: dict[int, float]):
        self.tokenizer, self.cost = tokenizer, cost

    def score(self, ids, past, level):
        vocab = max(self.cost) + 1
        out = np.zeros((len(ids), vocab), "float32")
        # log p(t) = -cost[t] requires logits = -cost + const with sum(exp(-cost)) = 1; use a free slack token
        for t, c in self.cost.items():
            out[:, t] = -c
        return out


def test_word_labels_follow_the_llm_surprisal(llm_tokenizer):
    text = "the cat sat on the xylophone quietly"
    enc = llm_tokenizer.encode(text, add_special_tokens=False)
    rng = np.random.default_rng(0)
    vocab = max(enc.ids) + 2
    cost = {t: float(c) for t, c in zip(range(vocab), rng.uniform(0.5, 8.0, vocab))}
    engine = FakeEngine(llm_tokenizer, cost)
    labels = train_tlm.word_labels(text, engine)
    logits = engine.score(enc.ids, 0, 1.0)
    logz = np.log(np.exp(logits[0].astype("float64")).sum())
    surprisal = [logz + cost[t] for t in enc.ids]  # -log softmax(logits)[t]
    surprisal[0] = max(surprisal[1:])
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    per_word = np.zeros(len(words))
    for value, (a, b) in zip(surprisal, enc.offsets):
        hits = [k for k, (s0, e0) in enumerate(words) if s0 < b and e0 > a]
        if hits:
            per_word[hits[0]] += value
    median = np.median(per_word)
    assert [lab for *_, lab in labels] == [int(v >= median) for v in per_word]
    assert [(s, e) for s, e, _ in labels] == words


def test_decision_label_is_the_most_capable_correct_feasible_plan():
    lat = planner.LatencyModel(
        {
            "schema": "elastilm.latency",
            "schema_version": 2,
            "prompt_lengths": [32, 512],
            "levels": [
                {"fraction": f, "ttft_ms": [f * 32, f * 512], "tpot_ms": [10 * (0.5 + f / 2)] * 2} for f in LEVELS
            ],
        }
    )
    ratios = [1.0, 0.5]
    correct = {(r, lv): int(lv <= 0.6) for r in ratios for lv in LEVELS}
    slo = planner.SLO(0.7, 1.0)  # TTFT 280 ms of 400: ratio 1.0 fits up to level 0.7, ratio 0.5 every level
    args = (400, 20, slo, lat, ratios, LEVELS, planner.NO_TLM)
    assert train_tlm.decision_label("t", correct, *args) == (1.0, 0.6)  # only <= 0.6 answers right
    compressed_right = {(r, lv): int(r == 0.5 and lv == 0.9) for r in ratios for lv in LEVELS}
    assert train_tlm.decision_label("t", compressed_right, *args) == (0.5, 0.9)
    none_right = {k: 0 for k in correct}
    assert train_tlm.decision_label("t", none_right, *args) == (0.5, 1.0)  # the largest feasible plan
    impossible = planner.SLO(0.01, 0.01)
    assert train_tlm.decision_label("t", correct, 400, 20, impossible, lat, ratios, LEVELS, planner.NO_TLM) is None


def test_sampled_slos_reach_budgets_the_full_model_meets():
    """The paper's pairs and <1, 1> always, then random ones; some random TPOT budgets lie above the full model's,
    so every level can be a label (a head that never saw one cannot choose it)."""
    import random

    from elastilm.evaluate.slo import PAPER_SLOS

    slos = train_tlm.sample_slos(random.Random(0), 24)
    assert len(slos) == 24 and slos[: len(PAPER_SLOS) + 1] == [*PAPER_SLOS, (1.0, 1.0)]
    assert all(0.1 <= a <= 1.0 and 0.5 <= b <= 1.1 for a, b in slos[len(PAPER_SLOS) + 1 :])
    assert any(b >= 1.0 for _, b in slos[len(PAPER_SLOS) + 1 :])
    lat = planner.LatencyModel(
        {
            "schema": "elastilm.latency",
            "schema_version": 2,
            "prompt_lengths": [32, 512],
            "levels": [
                {"fraction": f, "ttft_ms": [f * 32, f * 512], "tpot_ms": [10 * (0.5 + f / 2)] * 2} for f in LEVELS
            ],
        }
    )
    all_right = {(1.0, lv): 1 for lv in LEVELS}
    assert train_tlm.decision_label(
        "t", all_right, 400, 20, planner.SLO(1.0, 1.0), lat, [1.0], LEVELS, planner.NO_TLM
    ) == (1.0, 1.0)


def test_orchestrator_plans_compresses_and_generates(tmp_path_factory):
    """A tiny elastified model with a (random) TLM, built together; the answer is the engine's own greedy output
    for the compressed prompt at the planned level, and the report carries predictions and measurements."""
    from elastilm.runtime_py.engine import ElasticEngine
    from elastilm.runtime_py.orchestrator import Orchestrator, Request

    out, meta = tiny_build_with_tlm(tmp_path_factory)
    levels = meta["levels"]
    assert json.loads((out / "manifest.json").read_text())["tlm"] == "tlm"
    orch = Orchestrator(out)
    assert orch.calibration.plan_scale == (1.0, 1.0)
    context = " ".join(f"w{i}" for i in range(3, 30))
    parts = orch.parts("w5 w6 w7", context, chat=False)
    answer = orch.answer(Request("w5 w6 w7", context, False, planner.SLO(0.5, 0.9), max_new_tokens=4))
    p = answer.plan
    assert p.tpot_ms <= 0.9 * (1 + max(levels)) + 1e-9 or not p.feasible
    assert answer.compressed.achieved == len(answer.compressed.ids)
    expected = compress(parts, p.ratio, orch.tlm, orch.engine.tokenizer, question="w5 w6 w7")
    assert answer.compressed.ids == expected.ids
    engine = ElasticEngine(out)
    want = list(engine.generate_ids(expected.ids, p.level, 4))
    assert answer.text == "".join(engine.stream_text(iter(want)))
    assert len(orch.calibration.ratios[0]) == 1 and orch.calibration.ratios[0][0] > 0  # the measured TTFT was recorded
    report = answer.to_dict()
    assert report["prompt_tokens"]["achieved"] == len(expected.ids) and report["measured_ms"]["ttft"] > 0
    assert set(report) >= {"plan", "budget_ms", "measured_ms", "slo_met"}
    orch.close()
    engine.close()

    # a build re-made in a folder that has a latency profile stays loadable when the profile is re-measured
    from elastilm.compile.build import build
    from elastilm.compile.package import package
    from elastilm.formats.bundle import read as read_bundle

    build(out.parent, "host-cpu", out, max_len=64)
    (out / "latency.json").write_text((out / "latency.json").read_text().replace('"tpot_ms": [1', '"tpot_ms": [2'))
    ElasticEngine(out).close()

    bundle = package([out], tmp_path_factory.mktemp("bundle") / "app")
    entry = read_bundle(bundle)["models"][0]["tlm"]
    assert (bundle / entry["library"]).is_file() and entry["levels"] == levels and entry["window"] == meta["window"]
