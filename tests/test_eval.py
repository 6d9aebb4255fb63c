"""The accuracy harness: scoring arithmetic on a hand-computed case, the fixed splits, clear errors."""

import math

import numpy as np
import pytest

from elastilm.evaluate import harness, tasks
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py import choice


class ScriptedEngine:
    """Returns fixed log-probabilities and records what it was asked, in place of the compiled model."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def score(self, ids, past, level):
        self.calls.append(("score", list(ids), past, level))
        return np.log(np.array(self.rows[tuple(ids)], dtype="float64"))

    def prefill(self, ids, level, past):
        self.calls.append(("prefill", list(ids), past, level))
        return np.log(np.array(self.rows[tuple(ids)][-1], dtype="float64"))


def test_option_scores_match_the_hand_computed_answer():
    """Question [0] after 10 cached tokens; option A = [1] (2 chars), option B = [2, 3] (4 chars).
    P(first token | question) = (0.1, 0.2, 0.3, 0.4); P(3 | question, 2) = 0.25.
    A: ln 0.2 / 2 = -0.8047. B: (ln 0.3 + ln 0.25) / 4 = -0.6476. B wins per character (A would win unnormalised)."""
    engine = ScriptedEngine({(0,): [[0.1, 0.2, 0.3, 0.4]], (2,): [[0.25, 0.25, 0.25, 0.25]]})
    scores = choice.option_scores(engine, 10, [0], [[1], [2, 3]], 0.5, [2, 4])
    assert scores == pytest.approx([math.log(0.2) / 2, (math.log(0.3) + math.log(0.25)) / 4], abs=1e-9)
    assert scores[1] > scores[0] and math.log(0.2) > math.log(0.3) + math.log(0.25)
    # the question goes after the cached prefix, the option after the question; a one-token option needs no call
    assert engine.calls == [("prefill", [0], 10, 0.5), ("score", [2], 11, 0.5)]


def test_calibrated_task_subtracts_the_content_free_scores():
    """DroidTask options are scored against the content-free question once per option list. Question q -> ids [0],
    null question -> [9]. Option A = [1] " a" (2 chars), B = [2] " b" (2 chars).
    Raw: A ln0.6/2, B ln0.3/2 (A wins). Null: A ln0.8/2, B ln0.1/2. Calibrated: A ln(0.6/0.8)/2 = -0.1438,
    B ln(0.3/0.1)/2 = +0.5493: B wins."""
    engine = ScriptedEngine({(0,): [[0.05, 0.6, 0.3, 0.05]], (9,): [[0.05, 0.8, 0.1, 0.05]]})
    engine.encode = {"q": [0], tasks.NULL_QUESTION["droidtask"]: [9], " a": [1], " b": [2]}.__getitem__
    item, null = tasks.Item("x", "q", (" a", " b"), 1), {}
    for _ in range(2):
        got = harness.item_scores(engine, "droidtask", 4, item, 0.3, null)
        assert got == pytest.approx([math.log(0.6 / 0.8) / 2, math.log(0.3 / 0.1) / 2], abs=1e-9)
    assert [c[1] for c in engine.calls] == [[0], [9], [0]]  # the null question is scored once
    assert harness.item_scores(engine, "arc_easy", 4, item, 0.3, {}) == pytest.approx(
        [math.log(0.6) / 2, math.log(0.3) / 2]
    )


def test_log_softmax_normalises_any_logits():
    logits = np.array([[1000.0, 1001.0, 999.0], [-3.0, 0.0, 2.0]])
    out = choice.log_softmax(logits)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out[0], np.log(np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()), rtol=1e-12)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_splits_are_fixed_disjoint_and_fewshot_comes_from_tune(task):
    tune, report = tasks.items(task, "tune"), tasks.items(task, "report")
    assert tune and report and not {i.id for i in tune} & {i.id for i in report}
    assert [i.id for i in tasks.items(task, "report")] == [i.id for i in report]  # seeded: the same every time
    prefix = tasks.fewshot_prefix(task)
    assert all(f"{it.question}{it.options[it.answer]}" in prefix for it in tune[:5])
    assert not any(it.question in prefix for it in report[:50])
    assert all(0 <= it.answer < len(it.options) and all(o.startswith(" ") for o in it.options) for it in report)
    assert 0 < tasks.chance(task) < 1


def test_unknown_dataset_or_split_is_refused_with_the_valid_names(tmp_path):
    with pytest.raises(ElastiLMError, match="unknown split 'validation' of arc_easy; known: tune, report"):
        tasks.items("arc_easy", "validation")
    with pytest.raises(ElastiLMError, match="unknown dataset 'mmlu'; known: arc_easy, obqa, piqa, sciq, droidtask"):
        tasks.items("mmlu", "report")
    with pytest.raises(ElastiLMError, match="unknown dataset 'hellaswag'"):
        harness.evaluate(
            [harness.Run("adapters", tmp_path)], ["hellaswag"], [1.0], [1.0], 1, tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()  # refused before anything ran


class Words:
    """A word-per-token encoder standing in for the tokenizer in the compressor test."""

    def encode(self, text):
        return text.split(" ")


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.1, 0.0])
def test_baseline_compressor_keeps_the_instruction_and_the_latest_examples(ratio):
    engine = Words()
    full = harness.compress_prefix(engine, "obqa", 1.0)
    got = harness.compress_prefix(engine, "obqa", ratio)
    head = engine.encode(tasks.TASKS["obqa"][1] + "\n\n")
    assert got[: len(head)] == head
    assert len(got) == max(len(head), math.ceil(ratio * len(full)))
    assert got[len(head) :] == full[len(full) - (len(got) - len(head)) :]


def test_trace_report_says_when_every_request_of_a_strategy_failed(tmp_path):
    """A strategy whose requests all failed (e.g. a device lost for the whole run) is reported as such, beside the
    others' figures, instead of breaking the report."""
    from elastilm.evaluate import trace_report

    def row(strategy, app, ok, correct=True):
        return {
            "alpha": 0.0,
            "strategy": strategy,
            "app": app,
            "ok": ok,
            "correct": correct,
            "slo_met": True,
            "ttft_met": True,
            "tpot_met": True,
            "ttft_ms": 50.0,
            "e2e_ms": 200.0,
            "tpot_ms": 10.0,
        }

    rows = [row("elastilm", "GMail", True), row("elastilm", "Rewind", True, correct=False)]
    rows += [row("smallest", app, False) for app in ("GMail", "Rewind", "Rewind")]
    table = trace_report.summarize(rows, tmp_path, ["GMail", "Rewind"])
    overall = {r["strategy"]: r for r in table if r["app"] == "all"}
    assert overall["elastilm"]["accuracy_within_slo"] == 0.5 and overall["smallest"] == {
        "alpha": 0.0,
        "strategy": "smallest",
        "app": "all",
        "n": 0,
        "errors": 3,
    }
    text = (tmp_path / "trace.md").read_text()
    assert "all 3 requests failed" in text and "**50.0**" in text
    assert (tmp_path / "trace.png").is_file()
