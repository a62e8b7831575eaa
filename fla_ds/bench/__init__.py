"""``fla-ds bench WHAT``: benchmarks that print figures and ratios against a baseline measured
in the same run (docs/benchmarks.md keeps the figures with their commands).

    fla-ds bench data      the data path: shard build, loader, decode baselines
    fla-ds bench ingest    video ingest: seeking on long raw videos, build memory vs stored bytes
    fla-ds bench stage2    stage-2 step from the feature cache vs the encoder on the fly
    fla-ds bench gpu       one GPU in one call of under 10 minutes: stage-1 clips/s, MFU and
                           memory, loader clips/s per worker and the verdict, stage-2 7B QLoRA
                           tokens/s and memory under ZeRO-2/3, decoding (bench.tiny=true: CPU)
"""
from __future__ import annotations

BENCHES = ("data", "ingest", "stage2", "gpu")


def run(what: str, cfg, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Run one benchmark; returns the process exit code. ``overrides``: the command line's
    key=value list (``bench gpu`` applies it to the stage configs it benches)."""
    if what == "data":
        from fla_ds.bench.data import run_data

        return run_data(cfg)
    if what == "ingest":
        from fla_ds.bench.ingest import run_ingest

        return run_ingest(cfg)
    if what == "stage2":
        from fla_ds.bench.stage2 import run_stage2

        return run_stage2(cfg)
    if what == "gpu":
        from fla_ds.bench.gpu import run_gpu

        return run_gpu(cfg, overrides)
    raise ValueError(f"unknown benchmark '{what}' (valid: {', '.join(BENCHES)})")
