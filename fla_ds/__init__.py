"""fla_ds: gloss-free sign language translation (FLa-LLM) at cluster scale.

The package follows the pipeline, one module per step:
corpus (readers) -> shards (builder) -> stream (loader) -> model -> stage 1 / stage 2 -> evaluate.
"""
__version__ = "0.1.0"
