"""Recovery: one LoRA adapter per level, distilled from the full-width model.

Each level's sub-model is trained to match the full model's next-token distribution (KL on the logits) on the
calibration part of the essay corpus, which no evaluation uses, and (a share `chat` of the steps) along the full
model's own answers to chat prompts in the chat template (train/chat_answers.py; the KL there is taken on the
answer's positions only): sequence-level self-distillation in the format the model is served in.

Adapters sit on q, k, v, o, gate, up and down of every layer, full-width like the weights and sliced by the
level's prefix in the same way (`reference._linear`), so a level only ever trains and reads the rows and columns
it runs. They are never merged into the weights. All levels train in one loop over the same batches, so the
teacher's logits are computed once per batch. Level 1.0 is the teacher itself and gets no adapter.

Output: `adapters.safetensors` and `recover.json` in the elastified folder (formats/adapters.py), the scale alpha/r
folded into B. Training is resumable from `recover-checkpoint.safetensors` (train/checkpoint.py: no pickle).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from elastilm.compile import corpus, reference
from elastilm.compile.quantize import simulated
from elastilm.formats import adapters as adapters_file
from elastilm.formats import elastic, quant
from elastilm.formats.config import ModelConfig, projection_names
from elastilm.formats.errors import ElastiLMError
from elastilm.train import chat_answers, checkpoint

CHECKPOINT = "recover-checkpoint.safetensors"


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
    chat: float = (
        0.5  # share of the steps on the full model's chat answers (0: essays only; docs/results-generation.md)
    )
    answer_tokens: int = 96  # the longest full-model answer to a chat prompt
    bf16: bool = False  # the student's forward and backward under bf16 autocast (the teacher stays fp32)
    # the students' base weights as a build with this scheme (formats/quant.py) computes with them, so that each
    # adapter also corrects its level's quantization error (QLoRA-style); the teacher stays the fp32 full model
    quant: str = "q0f32"

    def is_chat(self, step: int) -> bool:
        """Whether `step` trains on chat answers: the chat steps spread evenly, floor(steps * chat) in all."""
        return math.floor((step + 1) * self.chat) > math.floor(step * self.chat)

    def chat_before(self, step: int) -> int:
        return math.floor(step * self.chat)

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


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, count: int | None = None):
    """KL(teacher || student) summed over the positions where `mask` is True, divided by `count` (the number of
    such positions in the whole batch, of which this may be one process's share; default: these)."""
    student_logp = F.log_softmax(student_logits.float(), -1)
    kl = F.kl_div(student_logp[mask], teacher_logp[mask], log_target=True, reduction="sum")
    return kl / (int(mask.sum()) if count is None else count)


def chat_batches(rows: list[dict], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prompt + answer sequences in batches, right-padded (causal attention never reads the padding), with the
    mask of the positions whose next token is an answer token."""
    out = []
    for start in range(0, len(rows) - batch + 1, batch):
        seqs = [r["ids"] + r["answer"] for r in rows[start : start + batch]]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (seq, r) in enumerate(zip(seqs, rows[start : start + batch])):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, len(r["ids"]) - 1 : len(seq) - 1] = True
        out.append((ids, mask))
    return out


def _save_checkpoint(path: Path, options, step: int, history: dict, seconds: float, adapters: dict, optims: dict):
    tensors = {
        f"adapter/{f:g}/{n}/{part}": t
        for f, ad in adapters.items()
        for n, pair in ad.items()
        for part, t in zip("AB", pair)
    }
    optim_meta = {}
    for f, o in optims.items():
        state, optim_meta[f"{f:g}"] = checkpoint.optimizer_state(f"optim/{f:g}", o)
        tensors |= state
    meta = {"options": asdict(options), "step": step, "history": history, "seconds": seconds, "optims": optim_meta}
    checkpoint.save(path, tensors, meta)


def recover(folder: Path, options: RecoverOptions = RecoverOptions(), progress: bool = True) -> dict:
    """Train every level's adapter (resuming from a checkpoint) and write adapters.safetensors + recover.json;
    nothing to do if they exist for the same options.

    Under `accelerate launch` (several processes or GPUs) it trains data-parallel: every process builds the same
    batches, takes its share of each batch's rows, and the adapters' gradients are summed across processes
    before every step, so the adapters equal a one-process run's up to float rounding."""
    from accelerate import Accelerator
    from tqdm import tqdm

    acc = Accelerator()
    if options.batch % acc.num_processes:
        raise ElastiLMError(f"--batch {options.batch} must be a multiple of the {acc.num_processes} processes")
    share = slice(acc.process_index, None, acc.num_processes)  # this process's rows of every batch

    folder = Path(folder)
    done = adapters_file.read_summary(folder)
    if done is not None and done.get("options") == asdict(options) and adapters_file.load(folder):
        return done  # already trained with these options (and the file checks out)
    model = elastic.load(folder)
    cfg = model.config
    params = {k: v.to(acc.device).requires_grad_(False) for k, v in model.params.items()}
    base = simulated(params, cfg, quant.scheme(options.quant))  # the students' (the teacher reads `params`)
    levels = [lv for lv in model.levels.values() if lv.fraction < 1.0]
    if not levels:
        raise ElastiLMError(f"{folder}: no level below 1.0 to recover")
    gen = torch.Generator().manual_seed(options.seed)
    adapters = {lv.fraction: _init(model.params, cfg, options.rank, gen) for lv in levels}
    optims = {
        f: torch.optim.AdamW([t for pair in ad.values() for t in pair], lr=options.lr, weight_decay=0.0)
        for f, ad in adapters.items()
    }
    history = {f"{lv.fraction:g}": [] for lv in levels}
    start, seconds = 0, 0.0
    ckpt_path = folder / CHECKPOINT
    if ckpt_path.is_file():
        tensors, meta = checkpoint.load(ckpt_path)
        if meta["options"] != asdict(options):
            raise ElastiLMError(
                f"{ckpt_path} was written with other options ({meta['options']}); delete it to start over"
            )
        for f, ad in adapters.items():
            for name, (a, b) in ad.items():
                a.data.copy_(tensors[f"adapter/{f:g}/{name}/A"])
                b.data.copy_(tensors[f"adapter/{f:g}/{name}/B"])
            checkpoint.load_optimizer_state(optims[f], f"optim/{f:g}", tensors, meta["optims"][f"{f:g}"])
        start, history, seconds = meta["step"], meta["history"], meta["seconds"]
    for ad in adapters.values():  # on the accelerator's device (the optimizers hold these same tensors)
        for a, b in ad.values():
            a.data, b.data = a.data.to(acc.device), b.data.to(acc.device)

    chat_steps = options.chat_before(options.steps)
    stream = corpus.token_stream(model.tokenizer, "calibration")
    essays = (options.steps - chat_steps) * options.batch
    windows = corpus.random_windows(stream, essays, options.seq_len, options.seed + 1) if essays else None
    chats = []
    if chat_steps:
        source, count = model.meta["source"]["model"], chat_steps * options.batch
        if acc.is_main_process:  # the others read the cache it writes
            chat_answers.distinct_answers(
                folder, source, model.tokenizer, count, options.answer_tokens, progress=progress
            )
        acc.wait_for_everyone()
        rows = chat_answers.distinct_answers(
            folder, source, model.tokenizer, count, options.answer_tokens, progress=False
        )
        chats = chat_batches(rows, options.batch)
    scale = options.alpha / options.rank
    torch.manual_seed(options.seed)
    bar = tqdm(
        range(start, options.steps),
        desc="recover",
        unit="step",
        disable=not (progress and acc.is_main_process),
        initial=start,
        total=options.steps,
    )
    for step in bar:
        t = time.perf_counter()
        if options.is_chat(step):
            batch, mask = chats[options.chat_before(step)]
        else:
            essay = step - options.chat_before(step)
            batch = windows[essay * options.batch : (essay + 1) * options.batch]
            mask = torch.ones(batch.shape, dtype=torch.bool)
        count = int(mask.sum())  # positions trained in the whole batch: each process divides its KL sum by it
        batch, mask = batch[share].to(acc.device), mask[share].to(acc.device)
        with torch.no_grad():
            teacher = F.log_softmax(reference.logits(params, cfg, batch), -1)
        for lv in levels:
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=options.bf16):
                student = reference.logits(
                    base, cfg, batch, model.widths(lv.fraction), _scaled(adapters[lv.fraction], scale)
                )
            loss = _kl(teacher, student, mask, count)
            optims[lv.fraction].zero_grad()
            loss.backward()
            if acc.num_processes > 1:  # data-parallel: the whole batch's gradient on every process
                for a, b in adapters[lv.fraction].values():
                    a.grad, b.grad = acc.reduce(a.grad, "sum"), acc.reduce(b.grad, "sum")
                loss = acc.reduce(loss.detach(), "sum")
            optims[lv.fraction].step()
            history[f"{lv.fraction:g}"].append(round(loss.item(), 5))
        seconds += time.perf_counter() - t
        bar.set_postfix({"kl@" + k: v[-1] for k, v in list(history.items())[:: max(1, len(history) // 3)]})
        if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps and acc.is_main_process:
            _save_checkpoint(ckpt_path, options, step + 1, history, seconds, adapters, optims)

    tail = max(1, options.steps // 8)
    summary = {
        "options": asdict(options),
        "teacher": "the full-width model (level 1.0); loss: KL(teacher || level) on next-token distributions",
        "base": f"the students' weights: {options.quant}"
        + (" (dequantized)" if quant.scheme(options.quant).quantized else ""),
        "data": f"{corpus.CORPUS_NAME}, calibration part, {(options.steps - chat_steps) * options.batch} windows of "
        f"{options.seq_len} tokens"
        + (
            f"; the full model's answers to {chat_steps * options.batch} chat prompts ({chat_answers.ANSWERS})"
            if chat_steps
            else ""
        ),
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
    if acc.is_main_process:
        trained = {
            f: {n: (a.detach().cpu(), b.detach().cpu() * scale) for n, (a, b) in ad.items()}
            for f, ad in adapters.items()
        }
        adapters_file.save(folder, trained, summary)
        ckpt_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return summary
