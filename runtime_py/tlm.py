"""The tiny language model (TLM) at run time: tokenization into windows and the two heads' outputs, no torch.

The TLM is a small BERT (see compile/tlm_model.py) that reads text in fixed windows ([CLS] text [SEP], padded and
masked), so compiled functions with static shapes serve any length: `score` over windows of `window` tokens for
compression, `decide` over one short window of `decide_window` tokens for the query (queries are short; a
longer one is cut to its start), so a decision costs a fraction of a scored window. It answers two
questions for the planner:
  token_scores(text)    keep probability of every TLM token of `text`, with its character span (compression)
  decide(query, slo)    log-probabilities over prompt ratios and over levels, from [CLS] of the user's query
                        and the SLO as fractions of the full model's TTFT and TPOT

`TLMBase` holds everything but the forward pass; `CompiledTLM` runs the TVM build (`elastilm compile` writes it
to <build>/tlm/, formats/tlm.py); the torch model (compile/tlm_model.py, run by train/train_tlm.py's `TorchTLM`)
is the other implementation and the parity reference.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from elastilm.formats import tlm as tlm_file
from elastilm.runtime_py.choice import log_softmax
from elastilm.runtime_py.planner import TLMCost


class TLMBase:
    """Windows and heads; subclasses provide `_forward(ids, mask, slo)` -> (keep logits (W,), ratio logits,
    level logits) for one window of either length."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = Path(folder)
        self.meta = meta
        self.window = meta["window"]
        self.decide_window = meta["decide_window"]
        self.ratios = tuple(meta["ratios"])
        self.levels = tuple(meta["levels"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / tlm_file.TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.cls_id, self.sep_id = (self.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))

    def _forward(self, ids: np.ndarray, mask: np.ndarray, slo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def windows(
        self, text: str, window: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """`text` as model inputs of `window` tokens (default: the scoring window): (ids (1, W) int64, mask
        (1, W) int64, character spans of the real tokens)."""
        window = window or self.window
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        per = window - 2
        out = []
        for start in range(0, max(len(enc.ids), 1), per):
            ids, spans = enc.ids[start : start + per], enc.offsets[start : start + per]
            row = [self.cls_id, *ids, self.sep_id]
            padded = np.zeros((1, window), "int64")
            padded[0, : len(row)] = row
            mask = np.zeros((1, window), "int64")
            mask[0, : len(row)] = 1
            out.append((padded, mask, list(spans)))
        return out

    def token_scores(self, text: str) -> list[tuple[int, int, float]]:
        """(start, end, keep probability) of every TLM token of `text`, in order."""
        out = []
        for ids, mask, spans in self.windows(text):
            keep = self._forward(ids, mask, np.zeros((1, 2), "float32"))[0]
            prob = 1.0 / (1.0 + np.exp(-keep[1 : 1 + len(spans)].astype("float64")))
            out += [(s, e, float(p)) for (s, e), p in zip(spans, prob)]
        return out

    def decide(self, query: str, ttft: float, tpot: float) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities over `self.ratios` and over `self.levels` for `query` under an SLO of `ttft` and
        `tpot` (fractions of the full model's latency); a query longer than the decision window is cut to its
        start."""
        ids, mask, _ = self.windows(query, self.decide_window)[0]
        _, ratio, level = self._forward(ids, mask, np.array([[ttft, tpot]], "float32"))
        return log_softmax(ratio.reshape(-1)), log_softmax(level.reshape(-1))

    def measure_cost(self, repeat: int = 5) -> TLMCost:
        """planner.TLMCost of this TLM here: the median time of a decision and of one scored window."""
        slo = np.zeros((1, 2), "float32")
        ms = []
        for window in (self.decide_window, self.window):
            ids, mask, _ = self.windows("measure " * window, window)[0]
            self._forward(ids, mask, slo)  # warm-up
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                self._forward(ids, mask, slo)
                times.append(1000 * (time.perf_counter() - t))
            ms.append(float(np.median(times)))
        return TLMCost(ms[0], ms[1], self.window - 2)


class CompiledTLM(TLMBase):
    """The TVM build of the TLM (<build>/tlm/): in this process, or in the LLM engine's `session` (over RPC the TLM
    then runs on the device beside the LLM, as it would in a phone app)."""

    def __init__(self, folder: str | Path, session=None):
        from elastilm.runtime_py.session import LocalSession

        folder = Path(folder)
        manifest = tlm_file.read_manifest(folder)
        super().__init__(folder, tlm_file.read_meta(folder))
        self.session = session or LocalSession()
        self.manifest = manifest
        self._load()

    def _load(self) -> None:
        s = self.session
        self._connection = s.connections
        with s.guard():
            self.vm = s.load(self.folder, self.manifest)
            self.functions = {self.window: self.vm["score"], self.decide_window: self.vm["decide"]}
            self.params = s.tensors(self.manifest["param_names"])

    def close(self) -> None:
        """Drop the handles (over RPC they hold the device session open)."""
        self.vm = self.functions = self.params = None

    def _forward(self, ids, mask, slo):
        s = self.session
        if self._connection != s.connections:  # the engine's session reconnected: load again on the device
            self._load()
        with s.guard():
            out = self.functions[ids.shape[1]](s.tensor(ids), s.tensor(mask), s.tensor(slo), *self.params)
            return tuple(s.item(out, i)[0] for i in range(3))
