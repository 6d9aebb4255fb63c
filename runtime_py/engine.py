"""ElasticEngine: load a build folder and generate text at any level. No torch at serve time.

One library and one copy of the full-width weights serve every level: a level is just the pair of symbolic
widths (active query heads, active FFN neuron blocks) passed to the kernels, so switching level between
requests moves no weights. The KV cache is allocated once, at the library's context window.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from elastilm.formats import build as build_file
from elastilm.formats import bundle, elastic, signature
from elastilm.formats.errors import ElastiLMError
from elastilm.formats.widths import Level, LevelTable, drop_count
from elastilm.runtime_py.sampling import GREEDY, Sampling, until_stop
from elastilm.runtime_py.session import (
    DEFAULT_RECONNECT,
    DEFAULT_TIMEOUT,
    DeviceLost,
    LocalSession,
    RemoteSession,
)

# prompt tokens per prefill call when a request can be cancelled (the service): long enough that the extra calls
# cost little, short enough that a client who left frees the model within a fraction of a second
PREFILL_CHUNK = 256


class ElasticEngine:
    """Generate with one compiled elastic model; `level` picks the sub-model per request."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        rpc: str | None = None,
        tracker: str | None = None,
        key: str | None = None,
        progress: bool = False,
        adapters: bool = True,
        quant: str | None = None,
        rpc_timeout: float = DEFAULT_TIMEOUT,
        reconnect_for: float = DEFAULT_RECONNECT,
    ):
        """Runs in this process, or with `rpc` (host:port) / `tracker` (host:port) + `key` on a device over RPC,
        which receives the library and weights once (cached there by checksum); there, a call that waits more than
        `rpc_timeout` seconds for the device fails, and a lost device is reconnected to for `reconnect_for` seconds
        (session.RemoteSession). `adapters`: run each level with
        its recovery adapter where the build has one (False: the plain sub-models). `quant`: the weight scheme the
        caller expects (formats/quant.py); a build of another is refused by name."""
        self.folder = Path(folder)
        self.use_adapters = adapters
        self.dropped_layers = 0  # > 0 on a view from `dropped`
        remote = rpc is not None or tracker is not None
        self.manifest = build_file.read_manifest(self.folder, runs="rpc" if remote else "here")
        have = self.manifest["quantization"]["scheme"]
        if quant is not None and have != quant:  # e.g. an app that ships 4-bit weights handed an fp32 build
            raise ElastiLMError(
                f"{self.folder}: its weights are {have}, expected {quant}; build it with "
                f"`elastilm compile --quant {quant}`"
            )
        self.elastic = elastic.read(self.folder)
        self.session = (
            RemoteSession(rpc, tracker, key, rpc_timeout, reconnect_for, progress) if remote else LocalSession(device)
        )
        self.max_len = self.manifest["context_window"]
        self._load()
        self.levels: LevelTable = elastic.levels(self.elastic)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tok_config = self.folder / "tokenizer_config.json"
        self.tokenizer_config = json.loads(tok_config.read_text()) if tok_config.is_file() else {}
        eos = self.tokenizer_config.get("eos_token")
        self.eos_id = self.tokenizer.token_to_id(eos) if isinstance(eos, str) else None

    def _load(self) -> None:
        """Library, weights and a zeroed KV cache on the session's device."""
        cfg = self.elastic["config"]
        m, s = self.manifest, self.session
        self._connection = s.connections
        with s.guard():
            self.vm = s.load(self.folder, m)
            self.functions = self._functions()
            self.params = s.arrays(m["param_names"])
            # switching level swaps these buffers only; levels without an adapter pass an all-zero set of the
            # build's `no_adapter_rank`: 0 (no rows, the update loops are empty) where the device allows empty tensors
            none = m["no_adapter_rank"]
            shapes = [signature.with_rank(shape, none) for shape in m["adapter_shapes"]]
            self.no_adapter = s.zeros(shapes, "lora0", m["adapter_dtype"])
            levels = m["adapter_levels"] if self.use_adapters else []
            self.adapters = {f: s.arrays([build_file.adapter_tensor(f, n) for n in m["adapter_names"]]) for f in levels}
        rows, width = m["cache_rows"], cfg["num_kv_heads"] * cfg["head_dim"]
        # K transposed, V as rows; zeroed once: attention reads whole blocks of keys and masks the unused ones
        self.caches = s.zeros([(width, rows), (rows, width)] * cfg["num_layers"], "kv")

    def _functions(self) -> dict:
        """The library's functions this engine calls, looked up once: the model's, or its layer-drop variant's."""
        return {
            signature.EMBED: self.vm[signature.EMBED],
            **{m: self.vm[signature.function_name(m, self.dropped_layers)] for m in signature.METHODS},
        }

    @property
    def layer_drops(self) -> dict[int, list[int]]:
        """The build's layer-dropping variants: {layers dropped: which} (ShortGPT baseline, compile/layer_drop.py)."""
        return {int(n): layers for n, layers in self.manifest.get("layer_drop", {}).items()}

    def drop_for_level(self, fraction: float) -> int:
        """The layer-drop variant with elastic level `fraction`'s share of the elastic parameters (0 at 1.0)."""
        return drop_count(self.elastic["config"]["num_layers"], self.levels[fraction].kept)

    def dropped(self, n: int) -> ElasticEngine:
        """This engine with n layers dropped (one of `layer_drops`; 0: this engine). A view: it shares the library,
        weights and KV cache, runs at full width (its only level is 1.0) and without adapters."""
        if n == 0:
            return self
        if n not in self.layer_drops:
            have = ", ".join(map(str, self.layer_drops)) or "none; run `elastilm layer-drop` and recompile"
            raise ElastiLMError(f"{self.folder}: no variant with {n} layers dropped (variants: {have})")
        view = copy.copy(self)
        view.dropped_layers = n
        view.functions = view._functions()
        view.levels = LevelTable([self.levels.full])
        view.adapters = {}
        return view

    def without_adapters(self) -> ElasticEngine:
        """This engine with no recovery adapter at any level (their ablation). A view, as in `dropped`."""
        view = copy.copy(self)
        view.adapters = {}
        return view

    def close(self) -> None:
        """Release the library, weights and cache; over RPC this ends the session (a TVM RPC server serves one
        session at a time)."""
        self.vm = self.functions = self.params = self.caches = self.adapters = self.no_adapter = None
        self.session.close()

    @classmethod
    def from_bundle(cls, folder: str | Path, model_id: str | None = None, **options) -> ElasticEngine:
        """The engine for one model of a verified app bundle (`elastilm package`): the only one, or `model_id`."""
        return cls(bundle.model_folder(folder, model_id), **options)

    # -- prompts ---------------------------------------------------------------------------------------------
    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """The prompt text in the model's chat template (plain text if it has none). The template comes from a model
        folder, so it renders in Jinja's immutable sandbox (as transformers renders it): a template that reaches for
        Python internals or mutates its inputs is refused, and nothing it does leaves the renderer."""
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        tokens = {k: v for k, v in self.tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
        try:
            template = self._chat_template
            if template is None:
                return user
            return template.render(messages=messages, add_generation_prompt=True, **tokens)
        except SecurityError as err:
            raise ElastiLMError(
                f"{self.folder}: the chat template tried an unsafe operation and is refused ({err})"
            ) from None
        except TemplateError as err:
            raise ElastiLMError(f"{self.folder}: the chat template does not render: {err}") from None

    @functools.cached_property
    def _chat_template(self):
        """The model's chat template compiled once, in the sandbox (None when it has none)."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template_file = self.folder / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else self.tokenizer_config.get("chat_template")
        if not source:
            return None

        def raise_exception(message):  # templates call it to reject a conversation they cannot format
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(source)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # -- the compiled model ------------------------------------------------------------------------------
    def _run(self, method: str, ids: list[int], past: int, lv: Level) -> np.ndarray:
        ids = np.asarray(ids, dtype="int64")
        vocab = self.elastic["config"]["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:  # the embedding gather does not check bounds
            raise ElastiLMError(f"token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
        s = self.session
        if self._connection != s.connections:  # the session reconnected (after a lost device): reload there
            self._load()
        with s.guard():
            embeddings = self.functions[signature.EMBED](s.tensor(ids.astype("int32")), self.params)
            args = signature.arguments(
                embeddings=embeddings,
                caches=self.caches,
                adapters=self.adapters.get(lv.fraction, self.no_adapter),
                past=s.shape(past),
                heads=s.shape(lv.heads),
                neuron_blocks=s.shape(lv.neuron_blocks(self.manifest["neuron_block"])),
            )
            out = self.functions[method](*args, self.params)
            logits = s.first(out)  # (1, vocab), or (T, vocab) for "score"
            return logits if method == "score" else logits[0]

    def prefill(self, ids: list[int], level: float, past: int = 0) -> np.ndarray:
        """Logits after `ids`, written into the cache after `past` positions already there (0: a new sequence)."""
        self._check_length(past + len(ids), 0)
        return self._run("prefill", ids, past, self.levels[level])

    def score(self, ids: list[int], past: int, level: float) -> np.ndarray:
        """Logits (T, vocab) at every position of `ids`, appended after the `past` positions already in the cache,
        which stay as they are: score several continuations of one cached context by calling this with the same
        `past`."""
        self._check_length(past + len(ids), 0)
        return self._run("score", ids, past, self.levels[level])

    def decode(self, token: int, past: int, level: float) -> np.ndarray:
        return self._run("decode", [token], past, self.levels[level])

    def _prefill_chunks(self, ids: list[int], lv: Level, cancelled, chunk: int):
        """The logits after `ids` (a new sequence), in one call, or chunk by chunk while `cancelled` is clear
        (None once it is set)."""
        if cancelled is None:
            return self._run("prefill", ids, 0, lv)
        logits = None
        for start in range(0, len(ids), chunk):
            if cancelled.is_set():
                return None
            logits = self._run("prefill", ids[start : start + chunk], start, lv)
        return logits

    def _check_length(self, prompt_tokens: int, new_tokens: int):
        if prompt_tokens == 0:
            raise ElastiLMError("empty prompt")
        if prompt_tokens + new_tokens > self.max_len:
            raise ElastiLMError(
                f"prompt of {prompt_tokens} tokens + {new_tokens} new tokens exceeds the context window of "
                f"{self.max_len} tokens; shorten the prompt or ask for at most {max(self.max_len - prompt_tokens, 0)} new tokens"
            )

    def generate_ids(
        self,
        ids: list[int],
        level: float = 1.0,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        cancelled=None,
        chunk: int = PREFILL_CHUNK,
    ) -> Iterator[int]:
        """Token ids one at a time, picked by `sampling` (greedy by default). The level is fixed per sequence.
        With `cancelled` (a threading.Event), the prompt is prefilled in chunks of `chunk` tokens and the sequence
        stops, without a token, at the first chunk boundary after the event is set: a long prefill for a client
        that has gone frees the model within one chunk."""
        lv = self.levels[level]
        self._check_length(len(ids), max_new_tokens)
        rng = np.random.default_rng(sampling.seed)
        try:
            logits = self._prefill_chunks(ids, lv, cancelled, chunk)
        except DeviceLost:  # nothing generated yet: reconnect and start over
            self.session.connect()
            logits = self._prefill_chunks(ids, lv, cancelled, chunk)
        if logits is None:
            return
        answer: list[int] = []
        for _ in range(max_new_tokens):
            if sampling.penalized:
                logits = sampling.penalize(logits, ids, answer)
            token = sampling.pick(logits, rng)
            yield token
            if token == self.eos_id:
                return
            try:
                logits = self._run("decode", [token], len(ids) + len(answer), lv)
            except DeviceLost:  # the device's KV cache is gone: reconnect, then recompute it from the tokens so far
                self.session.connect()
                logits = self._run("prefill", ids + answer + [token], 0, lv)
            answer.append(token)

    def generate(
        self,
        prompt: str,
        level: float = 1.0,
        max_new_tokens: int = 64,
        chat: bool = True,
        stream: bool = False,
        sampling: Sampling = GREEDY,
        system: str | None = None,
    ):
        """The completion of `prompt` as text, or with stream=True an iterator of text pieces as they come.
        `system`: text before the prompt (its system turn in the chat template; plain text: first)."""
        if chat:
            text = self.chat_prompt(prompt, system)
        else:
            text = f"{system}\n\n{prompt}" if system else prompt
        ids = self.encode(text)
        pieces = self.stream_text(self.generate_ids(ids, level, max_new_tokens, sampling), sampling.stop)
        return pieces if stream else "".join(pieces)

    def stream_text(self, tokens: Iterator[int], stop: Sequence[str] = ()) -> Generator[str, None, str]:
        """Text pieces for generated token ids, holding back incomplete UTF-8 sequences (and text that may begin a
        stop sequence). Ends at end-of-sequence or the first stop sequence (not shown), returning the finish
        reason: "stop" there, "length" when the tokens ran out."""

        eos = False

        def texts():
            nonlocal eos
            out: list[int] = []
            for token in tokens:
                if token == self.eos_id:
                    eos = True
                    return
                out.append(token)
                text = self.tokenizer.decode(out)
                if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                    yield text

        stopped = yield from until_stop(texts(), stop)
        return "stop" if stopped or eos else "length"
