"""Stage-2 language-model backends, by the name ``stage2.backend`` gives (a registry, like
``fla_ds.corpus.READERS`` for corpora): name -> the module that implements it."""
from __future__ import annotations

BACKENDS: dict[str, str] = {
    "decoder_only": "fla_ds.model.llm",
    "mbart": "fla_ds.model.mbart",
}
