"""What a run tells its user, from rank 0 only: a JSONL metrics file (always), TensorBoard
(behind train.tensorboard), and a progress bar on a terminal or plain periodic lines otherwise
(under Slurm, where a bar would fill the log with carriage returns)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, rank: int, loggers, total_steps: int):
        tensorboard = "tensorboard" in list(loggers)
        self.active = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("train.loggers=[jsonl,console,tensorboard] needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def step(self, step: int, **values) -> None:
        if not self.active:
            return
        self._write({"time": time.time(), "step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values.get('loss', 0):.3f}", lr=f"{values.get('lr', 0):.2e}", sps=f"{values.get('samples_per_s', 0):.1f}")
        else:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            print(f"step {step} {text}", flush=True)

    def event(self, kind: str, **values) -> None:
        if not self.active:
            return
        self._write({"time": time.time(), "event": kind, **values})
        if self.tb is not None and kind == "eval":
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"dev/{k}", v, values.get("step", 0))
        shown = {k: v for k, v in values.items() if not isinstance(v, str) or len(v) < 80}
        print(f"{kind}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
