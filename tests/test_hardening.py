"""Bad input and faults (README, "Bad input and faults"): each row's behaviour on the path a user hits."""

import json
import shutil

import pytest
from conftest import elastified_tiny

from elastilm.compile.build import build
from elastilm.formats import build as build_file
from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.engine import ElasticEngine


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    folder = elastified_tiny(tmp_path_factory, "llama")
    return build(folder, "host-cpu", tmp_path_factory.mktemp("b") / "build", max_len=40)


def with_template(build_dir, tmp_path, template: str):
    """A copy of the build whose model ships `template` as its chat template, listed in a consistent manifest (a
    hostile model, not a tampered one)."""
    out = tmp_path / "build"
    shutil.copytree(build_dir, out)
    (out / "chat_template.jinja").write_text(template)
    fields = json.loads((out / build_file.MANIFEST).read_text())
    for key in ("schema", "schema_version", "files"):
        fields.pop(key)
    build_file.write_manifest(out, fields)
    return out


# the classic escape from a Jinja template into Python: a global function's module globals, then os
ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"


def test_a_chat_template_that_reaches_for_python_is_refused_with_no_side_effect(tiny_build, tmp_path):
    marker = tmp_path / "ran"
    engine = ElasticEngine(with_template(tiny_build, tmp_path, ESCAPE.replace("MARKER", str(marker))))
    try:
        with pytest.raises(ElastiLMError, match="the chat template tried an unsafe operation and is refused"):
            engine.chat_prompt("hello")
    finally:
        engine.close()
    assert not marker.exists()


@pytest.mark.parametrize(
    "template,match",
    [
        ("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages }}", "unsafe operation"),
        ("{{ raise_exception('System role not supported') }}", "does not render: System role not supported"),
        ("{% for m in messages %}{{ m.content }", "does not render"),
    ],
)
def test_a_chat_template_that_mutates_rejects_or_breaks_gets_a_clear_error(tiny_build, tmp_path, template, match):
    engine = ElasticEngine(with_template(tiny_build, tmp_path, template))
    try:
        with pytest.raises(ElastiLMError, match=match):
            engine.chat_prompt("hello")
    finally:
        engine.close()


def test_a_well_behaved_chat_template_renders_as_transformers_renders_it(tiny_build, tmp_path):
    """Whitespace control as transformers applies it (trim_blocks, lstrip_blocks), checked against its own
    apply_chat_template on the same template."""
    from transformers import PreTrainedTokenizerFast

    template = (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}[S] {% endif %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    engine = ElasticEngine(with_template(tiny_build, tmp_path, template))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tiny_build / "tokenizer.json"))
    reference.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    try:
        assert engine.chat_prompt("hello", system="Be brief.") == expected
        assert expected.startswith("[S] <|system|>")  # trim_blocks and lstrip_blocks both acted
    finally:
        engine.close()


KILLED_IN_SECOND_CHECKPOINT = """
import json, os, signal, sys
from pathlib import Path
from elastilm.train import checkpoint, recover

real, calls = checkpoint.save_file, []

def dying(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:  # the second checkpoint: half of it written, then the process is killed
        Path(filename).write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, filename, metadata=metadata)

checkpoint.save_file = dying
recover.recover(Path(sys.argv[1]), recover.RecoverOptions(**json.loads(sys.argv[2])), progress=False)
"""


def test_recovery_killed_during_a_checkpoint_resumes_from_the_previous_one(tmp_path_factory, tmp_path):
    """kill -9 of a real `recover` process while it writes its second checkpoint: the first stays whole (the
    half-written file is never the checkpoint), and the resumed run ends with the adapters of an uninterrupted one."""
    import dataclasses
    import subprocess
    import sys

    import torch

    from elastilm.formats import adapters as adapters_file
    from elastilm.train import checkpoint, recover

    options = recover.RecoverOptions(
        rank=4, alpha=8.0, tokens=4 * 2 * 16, seq_len=16, batch=2, lr=1e-2, checkpoint_every=1, chat=0.0
    )
    source = elastified_tiny(tmp_path_factory, "llama")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(source, straight)
    shutil.copytree(source, killed)
    recover.recover(straight, options, progress=False)
    run = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SECOND_CHECKPOINT, str(killed), json.dumps(dataclasses.asdict(options))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == -9, run.stderr
    _, meta = checkpoint.load(killed / recover.CHECKPOINT)
    assert meta["step"] == 1 and not (killed / adapters_file.TENSORS).exists()
    recover.recover(killed, options, progress=False)
    expected, got = adapters_file.load(straight), adapters_file.load(killed)
    for f in expected:
        for name, (a, b) in expected[f].items():
            torch.testing.assert_close(got[f][name][0], a, rtol=0, atol=0)
            torch.testing.assert_close(got[f][name][1], b, rtol=0, atol=0)


def test_a_pickled_checkpoint_is_refused_not_loaded(tmp_path):
    """A checkpoint from an older version (or anyone) in pickle format never reaches an unpickler."""
    import pickle

    from elastilm.train import checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "recover-checkpoint.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ElastiLMError, match="not a readable checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


FIELDS = ("a", "b", "c")


def test_a_torn_last_row_is_dropped_with_a_warning_and_appending_goes_on(tmp_path):
    from elastilm.formats.files import resumable_rows

    path = tmp_path / "rows.csv"
    path.write_text("a,b,c\r\n1,2,3\r\n4,5,6\r\n7,8")  # killed while writing the third row
    with pytest.warns(UserWarning, match="dropped 1 torn row"):
        rows = resumable_rows(path, FIELDS)
    assert rows == [{"a": "1", "b": "2", "c": "3"}, {"a": "4", "b": "5", "c": "6"}]
    assert path.read_bytes() == b"a,b,c\r\n1,2,3\r\n4,5,6\r\n"  # rewritten whole, ready for the next row
    path.write_text("a,b,c\r\n1,2,3\r\n4,5,66")  # cut inside the last field: complete in count, no line end
    with pytest.warns(UserWarning):
        assert resumable_rows(path, FIELDS) == [{"a": "1", "b": "2", "c": "3"}]
    path.write_text("x,y\r\n1,2\r\n")
    with pytest.raises(ElastiLMError, match="written by another version"):
        resumable_rows(path, FIELDS)


def test_a_resumed_run_answers_a_torn_row_again_and_never_reuses_another_builds_rows(tmp_path_factory, tmp_path):
    """`quality --generate` (answers.csv), killed while writing its last row, then run again; then run on another
    build into the same folder."""
    from elastilm.evaluate import generation

    folder = elastified_tiny(tmp_path_factory, "llama")
    a = build(folder, "host-cpu", tmp_path / "a", max_len=40)
    prompts = tmp_path / "prompts.jsonl"  # words the tiny tokenizer spells
    prompts.write_text("".join(f'{{"id": "p{i}", "prompt": "w{i + 3} w{2 * i + 5} w9"}}\n' for i in range(3)))
    run = dict(variants=["no-adapters"], max_new_tokens=4, progress=False, prompts_file=prompts)
    out = tmp_path / "gen"
    generation.run(a, out, [1.0], **run)
    answers = out / "answers.csv"
    lines = answers.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    answers.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-row
    with pytest.warns(UserWarning, match="dropped 1 torn row"):
        (row,) = generation.run(a, out, [1.0], **run)
    assert row["answers"] == 3 and len(answers.read_bytes().splitlines()) == 4  # the torn one answered again, once

    b = build(folder, "host-cpu", tmp_path / "b", max_len=48)  # another build: none of a's rows count for it
    (row_b,) = generation.run(b, out, [1.0], **run)
    assert row_b["answers"] == 3 and len(answers.read_bytes().splitlines()) == 7


@pytest.mark.parametrize(
    "change, named",
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0 \\(must be an integer in 1..1024\\)"),
        ({"num_attention_heads": 10**9, "hidden_size": -4}, "hidden_size is -4.*num_attention_heads is 1000000000"),
        ({"intermediate_size": "40"}, "intermediate_size is '40'"),
        ({"num_key_value_heads": 4}, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ],
)
def test_a_bad_model_shape_is_refused_before_anything_is_allocated(tmp_path, change, named):
    from conftest import save_hf_folder

    from elastilm.compile import ingest

    save_hf_folder(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ElastiLMError, match=f"config.json: not a valid model shape: .*{named}"):
        ingest.ingest(str(tmp_path))


def test_a_tokenizer_that_cannot_encode_text_is_named_at_ingest(tmp_path):
    """Its unknown-word token is missing from its vocabulary: it fails on the first word it does not know."""
    from conftest import save_hf_folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from elastilm.compile import ingest

    save_hf_folder(tmp_path, "llama")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(tmp_path)
    with pytest.raises(ElastiLMError, match="its tokenizer cannot encode plain text .*Missing \\[UNK\\] token"):
        ingest.ingest(str(tmp_path))


def test_a_cancelled_request_stops_within_one_prefill_chunk(tiny_build):
    """The service passes each request's cancel event: the prompt is then prefilled in chunks (the same logits
    as one call), and a request cancelled during its prefill stops at the next chunk, without a token."""
    import threading

    import numpy as np

    engine = ElasticEngine(tiny_build)
    ids = np.random.default_rng(4).integers(0, engine.elastic["config"]["vocab_size"], 23).tolist()
    try:
        for level in (1.0, 0.5, 0.2):
            whole = list(engine.generate_ids(ids, level, 6))
            chunked = list(engine.generate_ids(ids, level, 6, cancelled=threading.Event(), chunk=5))
            assert chunked == whole
            lv = engine.levels[level]
            np.testing.assert_allclose(
                engine._prefill_chunks(ids, lv, threading.Event(), 5), engine._run("prefill", ids, 0, lv), atol=1e-4
            )
        cancel, calls, run = threading.Event(), [], engine._run

        def counted(method, *args):
            calls.append(method)
            cancel.set()  # the client leaves during the first chunk
            return run(method, *args)

        engine._run = counted
        assert list(engine.generate_ids(ids, 1.0, 6, cancelled=cancel, chunk=5)) == []
        assert calls == ["prefill"]  # one chunk of five, not the 23-token prompt, and no decode step
    finally:
        engine.close()
