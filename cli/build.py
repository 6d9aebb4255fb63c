"""compile, package: a library per target, and app bundles of builds."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile an elastified model for a target (one library for all levels)")
    p.add_argument("folder", type=Path, nargs="?", default=Path("dist/smollm2-135m"), help="an elastify output folder")
    p.add_argument("--target", default="host-cpu", help="a preset name from targets/")
    p.add_argument("--out", type=Path, default=None, help="default: FOLDER/TARGET")
    p.add_argument("--max-len", type=int, default=2048, help="context window (KV cache rows)")
    p.add_argument(
        "--quant",
        default="q0f32",
        help="weights: q0f32 (fp32), q4f32_mix (4-bit asymmetric groups, down_proj and embedding 8-bit), q4f32_1 "
        "or q8f32_1 (4/8-bit symmetric groups of 32)",
    )
    p.add_argument(
        "--check-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile OpenCL kernels with PoCL before writing the library (default: when PoCL is installed)",
    )
    p.set_defaults(run=compile_)

    p = sub.add_parser("package", help="bundle build folders with an app config for app assets")
    p.add_argument("builds", type=Path, nargs="+", help="compile output folders")
    p.add_argument("--out", type=Path, required=True, help="bundle folder, e.g. dist/bundle-android")
    p.set_defaults(run=package)


def compile_(args) -> None:
    from elastilm.compile.build import build
    from elastilm.formats import build as build_file

    out = build(args.folder, args.target, args.out, args.max_len, args.check_kernels, args.quant)
    manifest = build_file.read_manifest(out, verify=False, runs=None)
    size = (out / manifest["library"]).stat().st_size
    checked = ""
    if manifest["target"]["device"] == "opencl":
        checked = (
            ", kernels compiled by PoCL"
            if manifest["kernels_checked"]
            else ", OpenCL kernels NOT checked (no PoCL here)"
        )
    print(
        f"{manifest['target']['name']}: compiled in {manifest['compile_seconds']:.1f}s, {manifest['library']} "
        f"{size / 1e6:.1f} MB, context {manifest['context_window']} tokens{checked} -> {out}"
    )


def package(args) -> None:
    from elastilm.compile.package import package

    out = package(args.builds, args.out)
    print(f"bundle {out}: {', '.join(str(b) for b in args.builds)}")
