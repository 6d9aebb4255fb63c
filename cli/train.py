"""recover, train-tlm: the trained parts (recovery adapters per level, the TLM's two heads)."""

from __future__ import annotations

from pathlib import Path

from elastilm.formats.errors import ElastiLMError


def register(sub) -> None:
    p = sub.add_parser(
        "recover", help="train one LoRA adapter per level by distillation from the full model (resumable)"
    )
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--tokens", type=int, default=49152, help="training tokens per level (the time budget)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat", type=float, default=0.5, help="share of the steps on the full model's own chat answers (0..1)"
    )
    p.add_argument("--answer-tokens", type=int, default=96, help="the longest full-model chat answer")
    p.add_argument("--bf16", action="store_true", help="the students under bf16 autocast (the teacher stays fp32)")
    p.add_argument(
        "--quant",
        default="q0f32",
        help="train against the base weights of a build with this scheme (e.g. q4f32_1; compile with the same)",
    )
    p.set_defaults(run=recover)

    p = sub.add_parser(
        "train-tlm", help="train the TLM (compression + plan heads) from the elastic LLM's own answers (resumable)"
    )
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument(
        "--build", type=Path, default=None, help="its host build with latency.json (default FOLDER/host-cpu)"
    )
    p.add_argument("--layers", type=int, default=3, help="BERT layers of the backbone (of 6)")
    p.add_argument("--epochs", type=int, default=3, help="score-head epochs")
    p.add_argument("--passages", type=int, default=24, help="few-shot prompts per task labelled for the score head")
    p.add_argument("--essays", type=int, default=40, help="essay chunks labelled for the score head")
    p.add_argument("--grid-questions", type=int, default=16, help="tune questions per task run at every (ratio, level)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=train_tlm)


def recover(args) -> None:
    from elastilm.formats import quant
    from elastilm.train.recover import RecoverOptions, recover

    options = RecoverOptions(
        rank=args.rank,
        alpha=args.alpha,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        chat=args.chat,
        answer_tokens=args.answer_tokens,
        bf16=args.bf16,
        quant=quant.scheme(args.quant).name,  # a wrong name lists the valid ones
    )
    if not 0 <= options.chat <= 1:
        raise ElastiLMError(f"--chat must lie in [0, 1], got {options.chat}")
    summary = recover(args.folder, options)
    print(
        f"\nrecovery adapters (r={options.rank}, alpha={options.alpha:g}), {options.tokens} tokens per level, "
        f"{summary['train_seconds']:.0f}s"
    )
    print(f"{'level':>6} {'KL first':>9} {'KL last':>9}")
    for row in summary["levels"]:
        print(f"{float(row['fraction']):>6.0%} {row['kl_first']:>9.4f} {row['kl_last']:>9.4f}")
    print(f"wrote {args.folder}/adapters.safetensors and recover.json; compile again to use them")


def train_tlm(args) -> None:
    from elastilm.formats import tlm as tlm_file
    from elastilm.train.train_tlm import TLMOptions, summary, train_tlm

    options = TLMOptions(
        layers=args.layers,
        epochs=args.epochs,
        grid_questions=args.grid_questions,
        seed=args.seed,
        passages_per_task=args.passages,
        essay_chunks=args.essays,
    )
    out = train_tlm(args.folder, args.build or args.folder / "host-cpu", options)
    print("\n" + summary(tlm_file.read_meta(out)["training"]) + f"; wrote {out}")
