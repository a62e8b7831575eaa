"""Where a run's metrics go, by the names ``train.loggers`` gives (a registry)."""
from __future__ import annotations

LOGGERS: dict[str, str] = {
    "jsonl": "RUN/metrics.jsonl",
    "console": "a progress bar on a terminal, plain lines otherwise",
    "tensorboard": "RUN/tensorboard",
}
