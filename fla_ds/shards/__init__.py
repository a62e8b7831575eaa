"""Step 2 of the pipeline: corpus -> WebDataset tar shards (build, verify, format)."""
from fla_ds.shards.build import BuildError, build_shards
from fla_ds.shards.format import ShardFormatError, iter_raw_samples, parse_sample
from fla_ds.shards.index import IndexFormatError, load_index

__all__ = ["BuildError", "IndexFormatError", "ShardFormatError", "build_shards", "iter_raw_samples", "load_index", "parse_sample"]
