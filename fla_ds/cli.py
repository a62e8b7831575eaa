"""The ``fla-ds`` console command: one entry point, a subcommand per pipeline step.

    fla-ds synth --out PATH [key=value ...]
    fla-ds shards build --corpus NAME --root PATH --split SPLIT --out DIR [--workers N] [key=value ...]
    fla-ds shards verify DIR [--decode]
    fla-ds bench data [key=value ...]
    fla-ds demo [--out DIR] [key=value ...]

Every subcommand takes ``--config FILE_OR_NAME`` and trailing ``key=value`` overrides of the
one schema in fla_ds/config.py. Bad input is a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from fla_ds.config import ConfigError, load_config

USAGE_ERROR = 2


class UsageError(ValueError):
    """Bad command-line input; one line."""


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """Flags given on the command line become overrides ahead of the key=value ones."""
    out = [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr, None) is not None]
    return out + list(args.overrides)


def cmd_synth(args: argparse.Namespace) -> int:
    from fla_ds.corpus.synthetic import generate

    cfg = load_config(args.config, _overrides(args, {"out": "synth.out"}))
    path = generate(cfg.synth)
    print(f"synthetic corpus written to {path}")
    return 0


def cmd_shards_build(args: argparse.Namespace) -> int:
    from fla_ds.shards.build import build_shards

    flags = {"corpus": "corpus.name", "root": "corpus.root", "split": "corpus.split", "out": "shards.out", "workers": "shards.workers"}
    cfg = load_config(args.config, _overrides(args, flags))
    if not cfg.corpus.root:
        raise UsageError("--root is required (the corpus folder, or the manifest file)")
    summary = build_shards(cfg, progress_bar=not args.quiet)
    for line in summary.lines():
        print(line)
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from fla_ds.shards.verify import verify_folder

    checked, problems = verify_folder(args.dir, decode=args.decode)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"verified {checked} shards in {args.dir}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from fla_ds import bench

    cfg = load_config(args.config, args.overrides)
    return bench.run(args.what, cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from fla_ds.demo import run_demo

    cfg = load_config(args.config or "demo", _overrides(args, {"out": "demo.out"}))
    return run_demo(cfg)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file, or the name of a config shipped in fla_ds/configs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys, e.g. shards.workers=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fla-ds", description="FLa-LLM sign language translation at cluster scale")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic sign-language corpus (manifest layout)")
    p.add_argument("--out")
    _common(p)
    p.set_defaults(func=cmd_synth)

    shards = sub.add_parser("shards", help="build or verify WebDataset shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("build", help="pack one split of a corpus into tar shards")
    p.add_argument("--corpus", help="phoenix14t, csl-daily, how2sign, manifest or synthetic")
    p.add_argument("--root", help="the corpus as released (manifest: the manifest file or folder)")
    p.add_argument("--split")
    p.add_argument("--out")
    p.add_argument("--workers", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=cmd_shards_build)
    p = shards.add_parser("verify", help="re-read every shard of DIR against its index")
    p.add_argument("dir")
    p.add_argument("--decode", action="store_true", help="also decode every frame")
    p.set_defaults(func=cmd_shards_verify)

    p = sub.add_parser("bench", help="benchmarks that print figures and ratios against a baseline")
    p.add_argument("what", choices=["data"])
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic corpus")
    p.add_argument("--out")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _known_errors() -> tuple[type, ...]:
    from fla_ds.corpus.base import CorpusError
    from fla_ds.shards.build import BuildError
    from fla_ds.shards.format import ShardFormatError

    return (ConfigError, UsageError, CorpusError, BuildError, ShardFormatError)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _known_errors() as exc:
        print(f"fla-ds: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("fla-ds: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
