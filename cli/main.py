"""`elastilm` command line: parses arguments and calls the library; user errors print one line, exit 2.

Commands in data-flow order: elastify, layer-drop, quality (cli/elastify.py); recover, train-tlm (cli/train.py);
compile, package (cli/build.py); run, profile (cli/run.py); serve, device serve (cli/serve.py); eval, eval-slo,
bench trace (cli/evaluate.py).
"""

from __future__ import annotations

import argparse
import sys

from elastilm.cli import build, elastify, evaluate, run, serve, train
from elastilm.formats.errors import ElastiLMError

GROUPS = (elastify, train, build, run, serve, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastilm", description="ElastiLM-TVM: one elastic LLM, any width per request."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ElastiLMError as e:
        print(f"elastilm: error: {e}", file=sys.stderr)
        return 2
    return 0
