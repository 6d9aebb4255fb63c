"""Recovery: one LoRA adapter per level, distilled from the full-width model.

Each level's sub-model is trained to match the full model's next-token distribution (KL on the logits) on the
calibration part of the essay corpus, which no evaluation uses. Adapters sit on q, k, v, o, gate, up and down of
every layer, full-width like the weights and sliced by the level's prefix in the same way (`reference._linear`),
so a level only ever trains and reads the rows and columns it runs. They are never merged into the weights.
All levels train in one loop over the same batches, so the teacher's logits are computed once per batch.
Level 1.0 is the teacher itself and gets no adapter.

Output: `adapters.safetensors` and `recover.json` in the elastified folder (formats/adapters.py), the scale alpha/r
folded into B. Training is resumable from `recover.ckpt`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from elastilm.compile import corpus, reference
from elastilm.formats import adapters as adapters_file
from elastilm.formats import elastic
from elastilm.formats.config import ModelConfig, projection_names
from elastilm.formats.errors import ElastiLMError

CHECKPOINT = "recover.ckpt"


@dataclass(frozen=True)
class RecoverOptions:
    rank: int = adapters_file.DEFAULT_RANK  # the paper's r and alpha
    alpha: float = 16.0
    tokens: int = 49152  # training tokens per level: the budget
    seq_len: int = 128
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 8  # steps

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.seq_len * self.batch))


def _init(params: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, gen: torch.Generator) -> dict:
    """LoRA init: A small random, B zero, so every level starts exactly at its unadapted sub-model."""
    out = {}
    for name in projection_names(cfg):
        rows, cols = params[name + ".weight"].shape
        a = torch.randn(rank, cols, generator=gen) / math.sqrt(cols)
        out[name] = (a.requires_grad_(), torch.zeros(rows, rank, requires_grad=True))
    return out


def _scaled(adapters: dict, scale: float) -> dict:
    return {name: (a, b * scale) for name, (a, b) in adapters.items()}


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over all positions."""
    student_logp = F.log_softmax(student_logits, -1)
    return F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")


def recover(folder: Path, options: RecoverOptions = RecoverOptions(), progress: bool = True) -> dict:
    """Train every level's adapter (resuming from a checkpoint) and write adapters.safetensors + recover.json;
    nothing to do if they exist for the same options."""
    from tqdm import tqdm

    folder = Path(folder)
    done = adapters_file.read_summary(folder)
    if done is not None and done.get("options") == asdict(options) and adapters_file.load(folder):
        return done  # already trained with these options (and the file checks out)
    model = elastic.load(folder)
    cfg, params = model.config, model.params
    for p in params.values():
        p.requires_grad_(False)
    levels = [lv for lv in model.levels.values() if lv.fraction < 1.0]
    if not levels:
        raise ElastiLMError(f"{folder}: no level below 1.0 to recover")
    gen = torch.Generator().manual_seed(options.seed)
    adapters = {lv.fraction: _init(params, cfg, options.rank, gen) for lv in levels}
    optims = {
        f: torch.optim.AdamW([t for pair in ad.values() for t in pair], lr=options.lr, weight_decay=0.0)
        for f, ad in adapters.items()
    }
    history = {f"{lv.fraction:g}": [] for lv in levels}
    start, seconds = 0, 0.0
    ckpt_path = folder / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["options"] != asdict(options):
            raise ElastiLMError(
                f"{ckpt_path} was written with other options ({ckpt['options']}); delete it to start over"
            )
        for f, ad in adapters.items():
            for name, (a, b) in ad.items():
                a.data.copy_(ckpt["adapters"][f][name][0])
                b.data.copy_(ckpt["adapters"][f][name][1])
            optims[f].load_state_dict(ckpt["optims"][f])
        start, history, seconds = ckpt["step"], ckpt["history"], ckpt["seconds"]

    stream = corpus.token_stream(model.tokenizer, "calibration")
    windows = corpus.random_windows(stream, options.steps * options.batch, options.seq_len, options.seed + 1)
    scale = options.alpha / options.rank
    torch.manual_seed(options.seed)
    bar = tqdm(
        range(start, options.steps),
        desc="recover",
        unit="step",
        disable=not progress,
        initial=start,
        total=options.steps,
    )
    for step in bar:
        t = time.perf_counter()
        batch = windows[step * options.batch : (step + 1) * options.batch]
        with torch.no_grad():
            teacher = F.log_softmax(reference.logits(params, cfg, batch), -1)
        for lv in levels:
            loss = _kl(
                teacher,
                reference.logits(params, cfg, batch, model.widths(lv.fraction), _scaled(adapters[lv.fraction], scale)),
            )
            optims[lv.fraction].zero_grad()
            loss.backward()
            optims[lv.fraction].step()
            history[f"{lv.fraction:g}"].append(round(loss.item(), 5))
        seconds += time.perf_counter() - t
        bar.set_postfix({"kl@" + k: v[-1] for k, v in list(history.items())[:: max(1, len(history) // 3)]})
        if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
            torch.save(
                {
                    "options": asdict(options),
                    "step": step + 1,
                    "history": history,
                    "seconds": seconds,
                    "adapters": {
                        f: {n: (a.detach(), b.detach()) for n, (a, b) in ad.items()} for f, ad in adapters.items()
                    },
                    "optims": {f: o.state_dict() for f, o in optims.items()},
                },
                ckpt_path,
            )

    tail = max(1, options.steps // 8)
    summary = {
        "options": asdict(options),
        "teacher": "the full-width model (level 1.0); loss: KL(teacher || level) on next-token distributions",
        "data": f"{corpus.CORPUS_NAME}, calibration part, {options.steps * options.batch} windows of {options.seq_len} tokens",
        "train_seconds": round(seconds, 1),
        "levels": [
            {
                "fraction": f"{lv.fraction:g}",
                "kl_first": history[f"{lv.fraction:g}"][0],
                "kl_last": round(sum(history[f"{lv.fraction:g}"][-tail:]) / tail, 5),
            }
            for lv in levels
        ],
        "history": history,
    }
    adapters_file.save(
        folder,
        {f: {n: (a.detach(), b.detach() * scale) for n, (a, b) in ad.items()} for f, ad in adapters.items()},
        summary,
    )
    ckpt_path.unlink(missing_ok=True)
    return summary
