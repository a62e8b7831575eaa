"""The ``fla-ds`` console command: one entry point, a subcommand per pipeline step.

    fla-ds synth --out PATH [key=value ...]
    fla-ds shards build --corpus NAME --root PATH --split SPLIT --out DIR [--workers N] [key=value ...]
    fla-ds shards verify DIR [--decode]
    fla-ds config show [--config FILE_OR_NAME] [key=value ...]
    fla-ds train --stage 1|2 [--config ...] [--check] [key=value ...]   (fla_ds/train.py; any launcher:
        torchrun -m fla_ds train ..., deepspeed --module fla_ds train ..., srun fla-ds train ...)
    fla-ds features extract / evaluate / export / translate / report ...
    fla-ds bench data|ingest|stage2|gpu [key=value ...]
    fla-ds demo [--out DIR] [key=value ...]
    fla-ds report RUN [--out FILE] [--shards DIR] [--clips N]
    fla-ds --version

Subcommands that read the config take ``--config FILE_OR_NAME`` and ``key=value`` overrides of
the one schema (fla_ds/schema.py), before, between or after the flags. Bad input is a one-line
error and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fla_ds.config import ConfigError, explicit_keys, load_config, refuse_contradictions

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
    if summary.index is not None and not summary.index.get("language"):  # said now, not when stage 2 starts
        print("fla-ds: note: these shards record no language: stage 2 chooses its prompt by it; "
              "build with corpus.language=<code> (de, en, zh, ...) or give stage2.prompt", file=sys.stderr)
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    """Every problem one line (``PROBLEM ...``, naming index, shard and member), then a
    summary; exit 1 on any problem (a split with no samples included), 0 when the loader
    can read every split. Reads nothing outside DIR."""
    from fla_ds.shards.verify import verify_folder

    checked, problems = verify_folder(args.dir, decode=args.decode)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"verified {checked} shards in {args.dir}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from fla_ds import bench

    cfg = load_config(args.config or ("demo" if args.what == "stage2" else None), args.overrides)
    return bench.run(args.what, cfg, args.overrides)


def cmd_vocab(args: argparse.Namespace) -> int:
    from fla_ds.vocab import build_vocab_files

    path = build_vocab_files(args.tokenizer, args.shards, args.out, split=args.split)
    print(f"trimmed vocabulary written to {path}")
    return 0


def cmd_trim_mbart(args: argparse.Namespace) -> int:
    """mBART with its vocabulary cut to the training texts (the paper's approach), saved once
    as a folder that stage 2 trains from (stage2.backend=mbart stage2.model=OUT)."""
    from fla_ds.model.mbart import load_encoder_decoder, trim_mbart_vocab
    from fla_ds.vocab import shard_texts

    model, tokenizer = load_encoder_decoder(args.model)
    texts, _ = shard_texts(args.shards, args.split)
    keep = [args.lang] if args.lang else []
    model, id_map = trim_mbart_vocab(model, tokenizer, texts, keep_tokens=keep)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    id_map.save(args.out)
    print(f"mBART trimmed to {id_map.size} tokens ({len(texts)} training texts) -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Decode a split with a saved checkpoint (verified as it loads, fla_ds/artifacts.py);
    spread over ranks when launched by torchrun."""
    from omegaconf import OmegaConf

    from fla_ds.distributed import init_distributed, shutdown
    from fla_ds.evaluate.run import evaluate_split
    from fla_ds.inference import load_translator
    from fla_ds.stream import Source

    step_dir = resolve_checkpoint(args.checkpoint)
    translator = load_translator(step_dir, beam_size=args.beam)
    cfg = OmegaConf.merge(translator.cfg, {"eval": {"limit": args.limit}})
    if args.overrides:
        load_config(None, args.overrides)  # refuses unknown keys and wrong types
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(args.overrides)))
        # clips are read as the model's encoder was trained: an override saying otherwise is refused
        refuse_contradictions("augment", cfg.augment, translator.augment.settings, explicit_keys(None, args.overrides), f"{step_dir}")
        translator.use_decoding(cfg, beam_size=args.beam)  # eval.beam_size / eval.max_new_tokens overrides
    placement = init_distributed()
    try:
        out = Path(args.out) if args.out else step_dir / f"eval-{args.split}"
        source = Source(args.shards, translator.augment)
        metrics = evaluate_split(translator, cfg, placement.rank, placement.world_size, out, source, split=args.split)
    finally:
        shutdown()
    if placement.rank == 0:
        for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a"):
            print(f"{key:>9}: {metrics.get(key, float('nan')):.2f}")
        print(f"  n={metrics.get('n', 0)}; {metrics.get('convention', '')}")
        print(f"hypotheses and metrics in {out}")
    return 0


def resolve_checkpoint(path: str) -> Path:
    """A step folder, or a run folder's best checkpoint (the choice said on stderr, with the
    score that made it: stdout may be data)."""
    from fla_ds.checkpoint import describe_choice, resolve_step_dir

    try:
        step_dir = resolve_step_dir(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    note = describe_choice(path, step_dir)
    if note and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"fla-ds: {note}", file=sys.stderr)
    return step_dir


def cmd_features(args: argparse.Namespace) -> int:
    """Encode shards with a frozen stage-1 encoder; spread over ranks under torchrun."""
    from fla_ds.distributed import init_distributed, shutdown
    from fla_ds.features import extract_features

    step_dir = resolve_checkpoint(args.checkpoint)
    if (step_dir / "projector").exists() or (step_dir / "bundle.json").exists():
        raise UsageError(f"{step_dir}: a stage-2 checkpoint; features come from the stage-1 encoder (the run its stage2.encoder names)")
    placement = init_distributed()
    try:
        for split in args.split:
            entry = extract_features(step_dir, args.shards, args.out, split=split, views=args.views, batch_size=args.batch_size, num_workers=args.workers)
            if placement.rank == 0 and entry:
                print(f"features {split}: {entry['clips']} clips x {args.views} view(s), dim {entry['dim']}, {entry['bytes'] / 1e6:.1f} MB -> {args.out}")
    finally:
        shutdown()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A bundle from a stage-2 checkpoint, verified before anything is copied; a damaged or
    hostile file is one line naming it and exit 2, with no bundle written."""
    from fla_ds.inference import export_bundle

    out = export_bundle(resolve_checkpoint(args.checkpoint), args.out, merge=args.merge)
    print(f"inference bundle written to {out}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    """Translate clips with a bundle or step folder, verified as it loads (fla_ds/artifacts.py)."""
    from fla_ds.hypotheses import format_records
    from fla_ds.inference import translate_paths

    missing = [p for p in args.inputs if not Path(p).exists()]
    if missing:
        raise UsageError(f"no such video file or frame folder: {missing[0]}")
    # a bundle is verified as it loads (its own one-line errors); a run folder is resolved first
    model = Path(args.model) if (Path(args.model) / "bundle.json").is_file() else resolve_checkpoint(args.model)
    texts = translate_paths(model, args.inputs, beam_size=args.beam)
    for line in format_records(("input", "hypothesis"), zip(args.inputs, texts), args.format, header=args.header):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fla_ds.demo import run_demo

    cfg = load_config(args.config or "demo", _overrides(args, {"out": "demo.out"}))
    return run_demo(cfg)


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML page about a run (fla_ds/report/); a folder that is not a run,
    or a damaged file in it, is one line naming the file."""
    from fla_ds.report import write_report

    if args.clips < 0:
        raise UsageError(f"--clips must be 0 or more, not {args.clips}")
    print(write_report(args.run, out=args.out, shards=args.shards, clips=args.clips))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The resolved config (schema defaults <- file <- overrides), as a run would save it."""
    from fla_ds.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides), tooling=True), end="")
    return 0


def version_text() -> str:
    """fla-ds's version and the engines' it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    from fla_ds import __version__

    engines = ", ".join(f"{name} {of(name)}" for name in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "av"))
    return f"fla-ds {__version__} ({engines})"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file, or the name of a config shipped in fla_ds/configs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys, e.g. shards.workers=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fla-ds", description="FLa-LLM sign language translation at cluster scale")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    # listed for --help only: main() hands "train ..." to fla_ds/train.py before parsing
    sub.add_parser("train", add_help=False, help="train stage 1 or stage 2 (the same entry as fla_ds/train.py, under any launcher)")

    config = sub.add_parser("config", help="the configuration").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config (defaults <- --config file <- key=value)")
    _common(p)
    p.set_defaults(func=cmd_config_show)

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

    p = sub.add_parser("vocab", help="trim the stage-2 tokenizer's vocabulary to a corpus's training texts")
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer folder")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("trim-mbart", help="cut mBART's vocabulary to a corpus's training texts")
    p.add_argument("--model", required=True, help="mBART folder or hub id, e.g. facebook/mbart-large-cc25")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--lang", default="", help="language code token to keep, e.g. de_DE")
    p.set_defaults(func=cmd_trim_mbart)

    p = sub.add_parser("evaluate", help="translate a split with a checkpoint and score it")
    p.add_argument("--checkpoint", required=True, help="a step-N folder, or a run folder (its best checkpoint)")
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=0, help="beam size (default: the run's)")
    p.add_argument("--limit", type=int, default=0, help="only the first N samples")
    p.add_argument("--out", help="folder for hypotheses.tsv and metrics.json (default: beside the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_evaluate)

    features = sub.add_parser("features", help="the stage-2 feature cache").add_subparsers(dest="features_command", required=True)
    p = features.add_parser("extract", help="encode shards with a frozen stage-1 encoder into feature shards")
    p.add_argument("--checkpoint", required=True, help="stage-1 step folder, or run folder (its best)")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", nargs="+", default=["train", "dev"])
    p.add_argument("--views", type=int, default=1, help="1 + the number of augmented views per training clip")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("export", help="a standalone inference bundle from a stage-2 checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="fold the LoRA adapter into full-precision base weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("translate", help="translate video files or frame folders")
    p.add_argument("--model", required=True, help="a bundle, a stage-1/stage-2 step folder, or a run folder (its best)")
    p.add_argument("--beam", type=int, default=0, help="beam size (default: the model's eval.beam_size)")
    p.add_argument("--format", choices=["tsv", "jsonl"], default="tsv",
                   help="tsv: input<TAB>hypothesis, with \\ TAB LF CR escaped as \\\\ \\t \\n \\r; jsonl: one JSON object per line")
    p.add_argument("--header", action="store_true", help="tsv: a first line naming the columns")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("bench", help="benchmarks that print figures and ratios against a baseline")
    p.add_argument("what", choices=["data", "ingest", "stage2", "gpu"])
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic corpus")
    p.add_argument("--out")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="one self-contained HTML page about a training run: curves, scores, dev clips")
    p.add_argument("run", help="the run folder (train.out)")
    p.add_argument("--out", help="the HTML file to write (default: RUN/report.html)")
    p.add_argument("--shards", help="the video shard folder for the clips' frames (default: the one the run's config names)")
    p.add_argument("--clips", type=int, default=24, help="how many clips get frame strips, half the worst and half the best (default 24)")
    p.set_defaults(func=cmd_report)
    return parser


def _known_errors() -> tuple[type, ...]:
    """Errors whose message is one line for the user (exit 2, no traceback); ArtifactError:
    a damaged or hostile checkpoint, bundle or weights file (fla_ds/artifacts.py)."""
    from fla_ds.artifacts import ArtifactError
    from fla_ds.corpus.base import CorpusError
    from fla_ds.frames import SampleError
    from fla_ds.preflight import LaunchError
    from fla_ds.report.run import ReportError
    from fla_ds.shards.build import BuildError
    from fla_ds.shards.format import ShardFormatError
    from fla_ds.shards.index import IndexFormatError

    return (ConfigError, UsageError, CorpusError, BuildError, ShardFormatError, IndexFormatError, SampleError, ArtifactError, LaunchError, ReportError)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """key=value overrides may stand before, between or after the flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "inputs"):  # translate: clips may stand on both sides of the flags
        args.inputs += [t for t in extra if not t.startswith("-") and "=" not in t]
        extra = [t for t in extra if t.startswith("-") or "=" in t]
    stray = [t for t in extra if t.startswith("-") or "=" not in t]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no key=value overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the rest is train.py's command line, its own flags and help included
        import fla_ds.train

        fla_ds.train.PROG = "fla-ds train"
        return fla_ds.train.main(argv[1:])
    args = parse(argv)
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
