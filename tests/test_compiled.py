"""The compiled library (one for all widths) against the torch oracle, on tiny random models."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import elastified_tiny, random_ids

from elastilm.compile import reference
from elastilm.compile.build import build
from elastilm.compile.export import ExportShape, export, kernel_layout
from elastilm.formats import elastic as artifact
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.widths import Level
from elastilm.runtime_py.engine import ElasticEngine
from elastilm.runtime_py.sampling import Sampling


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-untied-bias"])
def compiled(request, tmp_path_factory):
    """Elastified with neuron blocks of 1, so levels land on odd widths (e.g. 13 of 40 neurons)."""
    out = elastified_tiny(tmp_path_factory, request.param)
    build_dir = build(out, "host-cpu", max_len=40)
    return artifact.load(out, with_tokenizer=False), ElasticEngine(build_dir)


def oracle_last_logits(model, ids, widths):
    return reference.logits(model.params, model.config, torch.tensor([ids]), widths)[0, -1].numpy()


def test_prefill_matches_oracle_at_every_level(compiled):
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=9, seed=4)[0].tolist()
    assert any(lv.neurons % 2 for lv in model.levels.values())  # odd widths are exercised
    for lv in model.levels.values():
        got = engine.prefill(ids, lv.fraction)
        expected = oracle_last_logits(model, ids, model.widths(lv.fraction))
        assert np.abs(got - expected).max() <= 1e-3, lv


@pytest.mark.parametrize("heads,blocks", [(1, 1), (5, 7), (6, 40)])
def test_odd_widths_outside_the_level_table(compiled, heads, blocks):
    model, engine = compiled
    cfg = model.config
    ids = random_ids(cfg, batch=1, length=6, seed=heads)[0].tolist()
    widths = [
        (cfg.num_heads, cfg.intermediate_size) if i in model.anchors else (heads, blocks) for i in range(cfg.num_layers)
    ]
    got = engine._run("prefill", ids, 0, Level(0.0, heads, blocks * engine.manifest["neuron_block"], 0.0))
    assert np.abs(got - oracle_last_logits(model, ids, widths)).max() <= 1e-3


def test_decode_with_kv_cache_matches_full_recompute(compiled):
    """Prefill 5 tokens, then decode one at a time; each step equals the oracle over the whole sequence."""
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=9, seed=7)[0].tolist()
    for fraction in (1.0, 0.5, 0.2):
        engine.prefill(ids[:5], fraction)
        for t in range(5, len(ids)):
            got = engine.decode(ids[t], t, fraction)
            expected = oracle_last_logits(model, ids[: t + 1], model.widths(fraction))
            assert np.abs(got - expected).max() <= 1e-3, (fraction, t)


def test_switching_level_between_requests_is_consistent(compiled):
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=8, seed=9)[0].tolist()
    first = engine.prefill(ids, 0.3)
    engine.prefill(ids, 1.0)
    assert np.array_equal(engine.prefill(ids, 0.3), first)


def test_greedy_generation_equals_oracle_greedy(compiled):
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=4, seed=11)[0].tolist()
    for fraction in (1.0, 0.4):
        got = list(engine.generate_ids(ids, fraction, max_new_tokens=10))
        seq = list(ids)
        for _ in range(len(got)):
            seq.append(int(np.argmax(oracle_last_logits(model, seq, model.widths(fraction)))))
        assert got == seq[len(ids) :]


def test_prefix_kernels_receive_whole_weight_buffers():
    """No weight is sliced or copied: every weight reaches a kernel as the full buffer, through call_tir only
    (the embedding lookup gathers token rows, never the matrix)."""
    from conftest import tiny_model
    from tvm import relax

    _, params, cfg = tiny_model("qwen2")
    mod, names = export(cfg, ExportShape(anchors=(0,), neuron_block=1, max_len=16))
    used = set()
    for fname in ("embed", "prefill", "decode"):
        fn = mod[fname]
        weight_vars = {}
        bindings = fn.body.blocks[0].bindings
        for binding in bindings:
            if isinstance(binding.value, relax.TupleGetItem) and binding.value.tuple_value.same_as(fn.params[-1]):
                weight_vars[binding.var] = names[binding.value.index]
        for binding in bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            args = value.args[1].fields if value.op.name.startswith("relax.call_tir") else value.args
            for pos, arg in enumerate(args):
                if arg not in weight_vars:
                    continue
                name = weight_vars[arg]
                used.add(name)
                if value.op.name == "relax.take":
                    assert fname == "embed" and name == "model.embed_tokens.weight"
                    continue
                assert value.op.name.startswith("relax.call_tir"), (name, value.op.name)
                kernel = mod[value.args[0]]
                assert [int(x) for x in kernel.params[pos].shape] == list(kernel_layout(name, params[name]).shape), name
    assert used == set(names)


def test_bad_requests_get_clear_errors(compiled, tmp_path):
    model, engine = compiled
    with pytest.raises(ElastiLMError, match="unknown level 0.45; valid levels are 0.2, "):
        engine.prefill([1, 2], 0.45)
    with pytest.raises(ElastiLMError, match="token ids must lie in \\[0, 97\\), got 5..97"):
        engine.prefill([5, 97], 1.0)
    with pytest.raises(
        ElastiLMError, match="prompt of 39 tokens \\+ 5 new tokens exceeds the context window of 40 tokens"
    ):
        list(engine.generate_ids(list(range(39)), 1.0, max_new_tokens=5))


def test_corrupt_weight_shard_is_refused(compiled, tmp_path):
    _, engine = compiled
    copy = tmp_path / "build"
    for f in engine.folder.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(engine.folder)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(engine.folder)).write_bytes(f.read_bytes())
    shard = sorted((copy / "params").glob("params_shard_*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ElastiLMError, match=f"{shard.name}: sha256 mismatch"):
        ElasticEngine(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tvm_version"] = "0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ElastiLMError, match="built with TVM 0.1"):
        ElasticEngine(copy)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(compiled):
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=5, seed=13)[0].tolist()
    greedy = list(engine.generate_ids(ids, 1.0, max_new_tokens=8))
    assert list(engine.generate_ids(ids, 1.0, 8, Sampling(temperature=1.0, top_p=1e-6, seed=1))) == greedy
    first = list(engine.generate_ids(ids, 1.0, 8, Sampling(temperature=1.5, seed=3)))
    assert list(engine.generate_ids(ids, 1.0, 8, Sampling(temperature=1.5, seed=3))) == first
    draws = {tuple(engine.generate_ids(ids, 1.0, 8, Sampling(temperature=1.5, seed=s))) for s in range(6)}
    assert len(draws) > 1  # sampling at temperature 1.5 over a random 97-token vocabulary varies with the seed


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_penalized_generation_equals_oracle_with_the_same_penalties(compiled, fraction):
    """Greedy after the repetition, frequency and presence penalties (on the prompt and the answer so far), step by
    step against the torch oracle's logits; the penalties change the answer."""
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=6, seed=17)[0].tolist()
    sampling = Sampling(repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4)
    got = list(engine.generate_ids(ids, fraction, 12, sampling))
    answer: list[int] = []
    for _ in range(len(got)):
        raw = oracle_last_logits(model, ids + answer, model.widths(fraction))
        logits = raw.copy()
        seen = set(ids) | set(answer)
        for t in seen:  # transformers' repetition penalty, by hand
            logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        for t in set(answer):  # OpenAI's frequency and presence penalties, by hand
            logits[t] -= answer.count(t) * 0.7 + 0.4
        answer.append(int(np.argmax(logits)))
    assert got == answer
    assert got != list(engine.generate_ids(ids, fraction, 12))


def test_stop_sequence_ends_the_text_before_it(compiled):
    model, engine = compiled
    ids = random_ids(model.config, batch=1, length=5, seed=19)[0].tolist()
    tokens = list(engine.generate_ids(ids, 0.5, 10))
    full = engine.tokenizer.decode(tokens)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    pieces = engine.stream_text(engine.generate_ids(ids, 0.5, 10), [stop])
    shown = []
    while True:
        try:
            shown.append(next(pieces))
        except StopIteration as end:
            reason = end.value
            break
    assert "".join(shown) == full[: full.find(stop)] and reason == "stop"
    assert "".join(engine.stream_text(iter(tokens))) == full


def test_cli_run_streams_without_loading_torch_or_the_compiler(compiled):
    """`elastilm run` on a build folder prints the completion and never loads torch, although it is installed
    (tvm_ffi imports it whenever it can: runtime_py loads TVM with torch hidden, about 200 MiB less resident
    memory), nor TVM's compiler library (another 111 MiB); torch still imports afterwards, and the environment
    that child processes inherit is as it was."""
    import subprocess
    import sys

    _, engine = compiled
    if not engine.encode("w3 w4 w5"):
        pytest.skip("transformers re-types the tiny Qwen2 tokenizer as byte-level BPE, which cannot spell 'w3'")
    code = (
        "import os, sys\n"
        "sys.argv = ['elastilm', 'run', '--build', sys.argv[1], '--level', '0.5', '--max-new-tokens', '5', "
        "'--no-chat', 'w3 w4 w5']\n"
        "from elastilm.cli.main import main\nassert main() == 0\n"
        "assert 'torch' not in sys.modules, 'serving loaded torch'\n"
        "assert 'libtvm_compiler' not in open('/proc/self/maps').read(), 'serving loaded the compiler'\n"
        "assert 'TVM_USE_RUNTIME_LIB' not in os.environ\n"
        "import torch\nprint(torch.ones(2).sum().item(), file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    run = subprocess.run([sys.executable, "-c", code, str(engine.folder)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    expected = engine.tokenizer.decode(list(engine.generate_ids(engine.encode("w3 w4 w5"), 0.5, 5)))
    assert run.stdout.strip() == expected.strip() and expected.strip()
    assert run.stderr.strip().endswith("2.0")


def test_cli_run_puts_the_context_before_the_prompt(compiled, capsys):
    """`elastilm run --context` without an SLO answers after the context (it was dropped: only an SLO run read it)."""
    from elastilm.cli.main import main

    _, engine = compiled
    if not engine.encode("w3 w4 w5"):
        pytest.skip("transformers re-types the tiny Qwen2 tokenizer as byte-level BPE, which cannot spell 'w3'")
    argv = ["run", "--build", str(engine.folder), "--max-new-tokens", "5", "--no-chat", "w3 w4 w5"]
    assert main([*argv[:-1], "--context", "w9 w1 w7 w2", argv[-1]]) == 0
    shown = capsys.readouterr().out.strip()
    with_context = engine.tokenizer.decode(list(engine.generate_ids(engine.encode("w9 w1 w7 w2\n\nw3 w4 w5"), 1.0, 5)))
    without = engine.tokenizer.decode(list(engine.generate_ids(engine.encode("w3 w4 w5"), 1.0, 5)))
    assert with_context != without  # else this model could not tell the two apart
    assert shown == with_context.strip()


def test_export_declares_upper_bounds_for_every_symbolic_extent():
    from conftest import tiny_model

    _, _, cfg = tiny_model("llama")
    mod, _ = export(cfg, ExportShape(anchors=(1,), neuron_block=8, max_len=48))
    bounds = {k: int(v) for k, v in mod["prefill"].attrs["tir_var_upper_bound"].items()}
    assert bounds == {
        "seq_len": 48,
        "past": 48,
        "heads": cfg.num_heads,
        "neuron_blocks": cfg.intermediate_size // 8,
        "lora_rank": 8,
    }
