"""Recovery adapters: the LoRA math on a prefix, resumable distillation, and the compiled model with adapter inputs
against the torch oracle."""

import json

import numpy as np
import pytest
import torch
from conftest import elastified_tiny, random_adapters, random_ids

from elastilm.compile import reference
from elastilm.compile.build import build
from elastilm.formats import adapters as adapters_file
from elastilm.formats import elastic as artifact
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.train import recover

TRAIN = recover.RecoverOptions(
    rank=4, alpha=8.0, tokens=6 * 2 * 16, seq_len=16, batch=2, lr=1e-2, checkpoint_every=1, chat=0.0
)


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = elastified_tiny(tmp_path_factory, "llama-untied-bias")
    return out


def test_adapter_on_a_prefix_equals_the_merged_weight_sliced(elastic):
    """Independent check of the LoRA path: a level with adapter (A, B) equals the same level of a model whose
    weights are W + B A, since a prefix of W + B A is W[:r, :c] + B[:r] A[:, :c]."""
    model = artifact.load(elastic, with_tokenizer=False)
    ids = random_ids(model.config, batch=2, length=7, seed=3)
    for lv in list(model.levels.values())[:-1:3]:
        ad = random_adapters(model, 3, seed=int(lv.fraction * 10))[lv.fraction]
        merged = dict(model.params)
        for name, (a, b) in ad.items():
            merged[name + ".weight"] = model.params[name + ".weight"] + b @ a
        widths = model.widths(lv.fraction)
        got = reference.logits(model.params, model.config, ids, widths, ad)
        torch.testing.assert_close(got, reference.logits(merged, model.config, ids, widths), rtol=1e-4, atol=1e-4)
        assert (got - reference.logits(model.params, model.config, ids, widths)).abs().max() > 0.1


def test_recovery_lowers_the_kl_and_resumes_to_the_same_adapters(elastic, tmp_path, monkeypatch):
    import shutil

    straight = tmp_path / "straight"
    shutil.copytree(elastic, straight)
    summary = recover.recover(straight, TRAIN, progress=False)
    for row in summary["levels"]:
        assert row["kl_last"] < row["kl_first"], row
    expected = adapters_file.load(straight)
    stamp = (straight / adapters_file.TENSORS).stat().st_mtime_ns
    assert recover.recover(straight, TRAIN, progress=False) == json.loads(
        (straight / adapters_file.SUMMARY).read_text()
    )
    assert (straight / adapters_file.TENSORS).stat().st_mtime_ns == stamp  # same options: nothing retrained
    assert sorted(expected) == list(artifact.load(straight, with_tokenizer=False).levels)[:-1]

    # the same run, interrupted in its fourth step and started again: it resumes from the checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(elastic, resumed)
    real, calls = reference.logits, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3 * (1 + len(expected)) + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover.recover(resumed, TRAIN, progress=False)
    assert (resumed / recover.CHECKPOINT).is_file() and not (resumed / adapters_file.TENSORS).exists()
    monkeypatch.setattr(reference, "logits", real)
    with pytest.raises(ElastiLMError, match="other options"):
        recover.recover(resumed, recover.RecoverOptions(**{**TRAIN.__dict__, "lr": 0.5}), progress=False)
    recover.recover(resumed, TRAIN, progress=False)
    got = adapters_file.load(resumed)
    for f in expected:
        for name, (a, b) in expected[f].items():
            torch.testing.assert_close(got[f][name][0], a, rtol=0, atol=0)
            torch.testing.assert_close(got[f][name][1], b, rtol=0, atol=0)
    assert not (resumed / recover.CHECKPOINT).exists()


def test_chat_batches_mask_the_answer_positions_only():
    rows = [{"ids": [5, 6, 7], "answer": [8, 9]}, {"ids": [4], "answer": [3, 2, 1]}]
    [(ids, mask)] = recover.chat_batches(rows, 2)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    # position t is trained when token t + 1 is an answer token
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    options = recover.RecoverOptions(tokens=10 * 4 * 128, chat=0.3)
    assert [options.is_chat(s) for s in range(10)].count(True) == options.chat_before(10) == 3


def test_canned_answers_are_left_out_and_replaced_by_further_prompts(monkeypatch):
    """Every prompt whose answer another prompt got word for word is dropped, both of them; the set is topped up
    from the next prompts (which can make an earlier answer canned too)."""
    from elastilm.train import chat_answers

    given = [[1, 2], [9], [3], [9], [3], [6], [4, 5], [7], [8]]  # [9] twice in the first 4; [3] again at p4
    asked = []

    def fake_answers(folder, source, tokenizer, count, max_new_tokens=96, progress=True):
        asked.append(count)
        return [{"id": f"p{i}", "answer": given[i]} for i in range(count)]

    monkeypatch.setattr(chat_answers, "answers", fake_answers)
    monkeypatch.setattr(chat_answers, "training_prompts", lambda n: [None] * 100)
    rows = chat_answers.distinct_answers(None, "src", None, 4)
    assert [r["id"] for r in rows] == ["p0", "p5", "p6", "p7"] and asked == [4, 6, 8]
    # a model that says one thing to everything: at most twice the prompts, then canned answers fill the rest
    given[:] = [[1, 2], [5]] + [[9]] * 20
    asked.clear()
    with pytest.warns(UserWarning, match="only 2 of the full model's answers to 8 prompts are not canned; 2 canned"):
        rows = chat_answers.distinct_answers(None, "src", None, 4)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"] and asked == [4, 6, 8]


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_chat_self_distillation_trains_on_the_full_models_own_answers(elastic, tmp_path, monkeypatch, share):
    """The answers are the full model's greedy continuations (the torch oracle's, step by step), cached and reused;
    a chat step's KL reads the answer positions only, and the run lowers it."""
    import shutil

    from elastilm.train import chat_answers

    folder = tmp_path / "chat"
    shutil.copytree(elastic, folder)
    model = artifact.load(folder)
    monkeypatch.setattr(  # words the tiny tokenizer spells, instead of the tune parts of the benchmarks
        chat_answers,
        "training_prompts",
        lambda n: [{"id": f"p{i}", "prompt": f"w{i + 3} w{i + 9} w4"} for i in range(40 if n is None else n)],
    )
    options = recover.RecoverOptions(**{**TRAIN.__dict__, "chat": share, "answer_tokens": 5})
    summary = recover.recover(folder, options, progress=False)
    rows = [json.loads(line) for line in (folder / chat_answers.ANSWERS).read_text().splitlines()]
    # at least the steps' worth (more where canned answers were replaced by further prompts)
    assert len(rows) >= options.chat_before(options.steps) * options.batch == 12 * share
    eos = model.tokenizer.convert_tokens_to_ids(model.tokenizer.eos_token)
    for row in rows:
        seq = list(row["ids"])
        for _ in range(5):
            seq.append(int(reference.logits(model.params, model.config, torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == eos:
                break
        assert row["answer"] == seq[len(row["ids"]) :]
    ids, mask = recover.chat_batches(rows, len(rows))[0]  # all answers: the KL on them falls at every level
    teacher = torch.log_softmax(reference.logits(model.params, model.config, ids), -1)
    trained = adapters_file.load(folder)
    for fraction, adapter in trained.items():
        widths = model.widths(fraction)
        after = recover._kl(teacher, reference.logits(model.params, model.config, ids, widths, adapter), mask)
        before = recover._kl(teacher, reference.logits(model.params, model.config, ids, widths), mask)
        assert after < before, fraction
    assert "chat prompts" in summary["data"]
    stamp = (folder / chat_answers.ANSWERS).stat().st_mtime_ns
    chat_answers.answers(folder, model.meta["source"]["model"], model.tokenizer, len(rows), 5, progress=False)
    assert (folder / chat_answers.ANSWERS).stat().st_mtime_ns == stamp  # cached: nothing answered again


def test_sharded_kl_gradients_sum_to_the_whole_batch(elastic):
    """Data-parallel recovery: each process's KL sum over its rows, divided by the whole batch's count of trained
    positions, has gradients that add up to the one-process gradient (masks of different sizes per row)."""
    model = artifact.load(elastic, with_tokenizer=False)
    cfg, params = model.config, model.params
    rng = np.random.default_rng(2)
    rows = [
        {"ids": rng.integers(0, 97, n).tolist(), "answer": rng.integers(0, 97, k).tolist()}
        for n, k in [(3, 5), (6, 2), (2, 7), (4, 4)]
    ]
    ids, mask = recover.chat_batches(rows, 4)[0]
    adapters = random_adapters(model, 3, seed=4)[0.5]
    widths = model.widths(0.5)

    def grads(rows_of):
        teacher = torch.log_softmax(reference.logits(params, cfg, ids[rows_of]), -1)
        ad = {n: (a.clone().requires_grad_(), b.clone().requires_grad_()) for n, (a, b) in adapters.items()}
        student = reference.logits(params, cfg, ids[rows_of], widths, ad)
        recover._kl(teacher, student, mask[rows_of], int(mask.sum())).backward()
        return [t.grad for pair in ad.values() for t in pair]

    whole, first, second = grads(slice(None)), grads(slice(0, None, 2)), grads(slice(1, None, 2))
    for w, x, y in zip(whole, first, second):
        torch.testing.assert_close(x + y, w, rtol=1e-5, atol=1e-7)
    assert sum(w.abs().sum() for w in whole) > 0


def test_accelerate_launch_on_two_processes_gives_the_one_process_adapters(elastic, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU) runs `elastilm recover` data-parallel, essays and chat
    answers, and ends with the adapters of one process up to float rounding."""
    import shutil
    import socket
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(elastic, one)
    shutil.copytree(elastic, two)
    options = recover.RecoverOptions(rank=4, alpha=8.0, tokens=4 * 4 * 16, seq_len=16, batch=4, lr=1e-2, chat=0.5)
    recover.recover(one, options, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "elastilm", "recover", str(two)]
    launch += ["--rank", "4", "--alpha", "8", "--tokens", "256", "--seq-len", "16", "--batch", "4", "--lr", "0.01"]
    run = subprocess.run(launch + ["--chat", "0.5"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads((f / adapters_file.SUMMARY).read_text()) for f in (one, two)]
    assert summaries[0]["options"] == summaries[1]["options"]
    for level, losses in summaries[0]["history"].items():  # every step's whole-batch KL, summed over processes
        assert summaries[1]["history"][level] == pytest.approx(losses, abs=1e-4)
    want, got = adapters_file.load(one), adapters_file.load(two)
    assert sorted(got) == sorted(want)
    model = artifact.load(one, with_tokenizer=False)
    ids = random_ids(model.config, batch=2, length=12, seed=21)
    for f in want:
        # Adam's normalised steps amplify the rounding of gradients summed in another order (a few elements differ
        # by ~1e-3), so the adapters are compared by what they compute: the same logits, to 10x below the change
        # that training made in them (test_sharded_kl_gradients_sum_to_the_whole_batch checks the gradients exactly)
        widths = model.widths(f)
        ref = reference.logits(model.params, model.config, ids, widths, want[f])
        change = (ref - reference.logits(model.params, model.config, ids, widths)).abs().max()
        diff = (reference.logits(model.params, model.config, ids, widths, got[f]) - ref).abs().max()
        assert change > 0.05 and diff < 0.1 * change, (f, float(diff), float(change))


@pytest.fixture(scope="module")
def adapted(elastic, tmp_path_factory):
    """The tiny model with large random adapters, compiled; the build runs each level with its adapter."""
    import shutil

    folder = tmp_path_factory.mktemp("adapted")
    shutil.copytree(elastic, folder, dirs_exist_ok=True)
    model = artifact.load(folder, with_tokenizer=False)
    adapters = random_adapters(model, 4, seed=11)
    adapters_file.save(folder, adapters, {"note": "random adapters for tests"})
    return model, adapters, build(folder, "host-cpu", max_len=40)


def oracle(model, ids, fraction, adapters):
    return reference.logits(model.params, model.config, torch.tensor([ids]), model.widths(fraction), adapters)[
        0
    ].numpy()


def test_compiled_adapters_match_the_oracle_at_every_level(adapted):
    model, adapters, build_dir = adapted
    ids = random_ids(model.config, batch=1, length=9, seed=5)[0].tolist()
    with_adapters, plain = ElasticEngine(build_dir), ElasticEngine(build_dir, adapters=False)
    view = with_adapters.without_adapters()  # the adapters' ablation: the same engine, its levels without them
    for lv in reversed(list(model.levels.values())):  # switching level swaps the adapter set between calls
        ad = adapters.get(lv.fraction)
        got = with_adapters.prefill(ids, lv.fraction)
        assert np.abs(got - oracle(model, ids, lv.fraction, ad)[-1]).max() <= 1e-3, lv
        if ad is not None:  # the adapter changes the output, and the plain engine runs without it
            assert np.abs(got - oracle(model, ids, lv.fraction, None)[-1]).max() > 0.1
        assert np.abs(plain.prefill(ids, lv.fraction) - oracle(model, ids, lv.fraction, None)[-1]).max() <= 1e-3
        assert np.abs(view.prefill(ids, lv.fraction) - oracle(model, ids, lv.fraction, None)[-1]).max() <= 1e-3


def test_score_gives_every_position_after_a_cached_context(adapted):
    """score(continuation, past) after prefill(context) equals the oracle over context + continuation (prefill
    with `past` its last row), and several continuations of one context leave the context intact."""
    model, adapters, build_dir = adapted
    engine = ElasticEngine(build_dir)
    ids = random_ids(model.config, batch=1, length=14, seed=8)[0].tolist()
    for fraction in (0.2, 0.5, 1.0):
        ad = adapters.get(fraction)
        engine.prefill(ids[:6], fraction)
        for cut in (11, 9, 14):  # continuations of different lengths, all after the same 6 cached tokens
            expected = oracle(model, ids[:cut], fraction, ad)[6:]
            np.testing.assert_allclose(engine.score(ids[6:cut], 6, fraction), expected, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(engine.prefill(ids[6:cut], fraction, past=6), expected[-1], rtol=1e-3, atol=1e-3)


def test_a_changed_adapter_file_is_refused(adapted, tmp_path):
    import shutil

    model, _, build_dir = adapted
    folder = tmp_path / "m"
    shutil.copytree(build_dir.parent, folder, ignore=shutil.ignore_patterns("host-cpu"))
    data = bytearray((folder / adapters_file.TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (folder / adapters_file.TENSORS).write_bytes(bytes(data))
    with pytest.raises(ElastiLMError, match="checksum"):
        build(folder, "host-cpu", max_len=40)
    assert json.loads((folder / adapters_file.SUMMARY).read_text())["sha256"]


def test_generation_quality_scores_answers_with_the_full_model_and_resumes(adapted, tmp_path):
    """quality --generate: every answer's full-model NLL equals the torch oracle's at level 1.0, the summary pools
    what answers.csv holds, and a rerun answers nothing again."""
    import csv

    from elastilm.evaluate import generation

    model, adapters, build_dir = adapted
    file = tmp_path / "prompts.jsonl"  # words the tiny tokenizer spells
    file.write_text("".join(f'{{"id": "p{i}", "prompt": "w{i + 3} w{2 * i + 5} w9"}}\n' for i in range(4)))
    run = dict(variants=["adapters", "no-adapters"], limit=3, max_new_tokens=6, progress=False, prompts_file=file)
    rows = generation.run(build_dir, tmp_path, [1.0, 0.5], **run)
    with (tmp_path / "answers.csv").open() as f:
        answers = list(csv.DictReader(f))
    assert len(answers) == 2 * 2 * 3 and {r["variant"] for r in answers} == {"adapters", "no-adapters"}
    engine = ElasticEngine(build_dir, adapters=False)
    prompts = {p["id"]: p["prompt"] for p in generation.prompts(3, file)}
    for r in answers:
        ids = [int(t) for t in r["answer_ids"].split()]
        prompt = engine.encode(engine.chat_prompt(prompts[r["id"]]))
        logp = torch.log_softmax(torch.tensor(oracle(model, prompt + ids, 1.0, None)).double(), -1)
        want = -sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids))
        assert float(r["nll_sum"]) == pytest.approx(want, rel=1e-3, abs=1e-3)
        assert (int(r["repeats"]), int(r["ngrams"])) == generation.repeats(ids)
    half = [r for r in answers if r["variant"] == "adapters" and r["level"] == "0.5"]
    summary = {(s["variant"], s["level"]): s for s in rows}
    tokens = sum(int(r["tokens"]) for r in half)
    assert summary[("adapters", 0.5)]["nll_full"] == pytest.approx(sum(float(r["nll_sum"]) for r in half) / tokens)
    assert summary[("adapters", 1.0)]["rouge_l"] == 1.0 and summary[("adapters", 1.0)]["nll_ratio"] == 1.0
    # the adapters change the 50% answers (random adapters are large), not the full model's
    plain = {r["id"]: r["answer_ids"] for r in answers if r["variant"] == "no-adapters" and r["level"] == "0.5"}
    assert any(r["answer_ids"] != plain[r["id"]] for r in half)
    generation.run(build_dir, tmp_path, [1.0, 0.5], **run)
    with (tmp_path / "answers.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(answers)
    generation.compare({"one run": tmp_path}, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert (tmp_path / "generation.png").stat().st_size > 0 and "| adapters | 50% |" in (
        tmp_path / "generation.md"
    ).read_text()


def test_generation_refuses_the_adapters_variant_on_a_build_without_adapters(adapted, tmp_path):
    import shutil

    from elastilm.evaluate import generation

    plain = tmp_path / "plain"
    shutil.copytree(adapted[2], plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["adapter_levels"] = []  # as a build compiled before recover writes
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ElastiLMError, match="has no recovery adapters.*use --variants no-adapters"):
        generation.run(plain, tmp_path / "out", [1.0, 0.5], limit=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_repeated_ngrams_by_hand():
    from elastilm.evaluate.generation import repeats

    # 4-grams of 1 2 3 4 1 2 3 4 1: 1234 2341 3412 4123 1234* 2341* -> 2 repeats of 6
    assert repeats([1, 2, 3, 4, 1, 2, 3, 4, 1]) == (2, 6)
    assert repeats([7, 7, 7]) == (0, 0) and repeats([5] * 6) == (2, 3)
