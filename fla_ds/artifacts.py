"""Trained artifacts are untrusted input: the one place that opens weight files and checks
folders before anything is loaded from them.

What is verified when an artifact (a stage-1 or stage-2 step folder, an inference bundle) is
loaded by ``fla-ds evaluate``, ``translate``, ``export``, ``features extract`` or stage-2
training (its stage-1 encoder):

1. The folder's ``COMPLETE`` manifest (``verify_folder``): every file it lists present, a
   regular file inside the folder, of the listed size and sha256; and a sub-folder that holds
   listed files holds nothing else (a weights file dropped into ``adapter/`` later is refused).
   Step folders always have a manifest (the trainer writes it last); bundles get one from
   ``fla-ds export``. A folder without one is refused: it was interrupted while saving, or is a
   bundle from before manifests (export it again). DeepSpeed's ``engine/`` state, which only
   resuming reads, is checked for presence and size here; resuming hashes it itself.
2. Weights are read as safetensors only, with the ``safetensors`` library (``load_safetensors``,
   ``check_safetensors``): a pickle, a zip (``torch.save``), a header that is too large, not
   JSON, names a key twice, or whose shapes and offsets do not account for the bytes, and a
   truncated file are each refused by name. Nothing from an artifact goes through
   ``torch.load``; a folder holding ``*.bin``/``*.pt`` weights (which peft and transformers
   would read with ``torch.load``) is refused.
3. Every state dict is loaded strictly (``load_state``): a missing or unexpected key, or a
   shape that differs from the model the folder's config builds (weights of another model
   size), is refused naming the file and the first offending key with both shapes.
4. Hugging Face folders (the LoRA ``adapter/``, a merged ``model/``, ``mbart/``): the files
   are checked first (safetensors only, the config JSON parses, every header consistent), an
   adapter's tensors are compared with the shapes its config gives on the base model (built on
   the meta device, no weights read), and whatever peft or transformers still raise, or report
   as missing, unexpected or mismatched, becomes one line naming the folder.

Every failure is an ``ArtifactError``: one line naming the file and what is wrong; ``fla-ds``
prints it and exits 2. No message suggests unsafe loading.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from fla_ds.atomic import sha256_file

MANIFEST = "COMPLETE"
TRAINING_STATE = "engine"
"""Sub-folder of DeepSpeed's training state: size-checked on load, hashed by resume."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in formats read with ``torch.load`` (pickle): refused wherever weights are read."""
MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on a header."""
MAX_JSON_BYTES = 64 << 20
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
UNSAFE_ADVICE = re.compile(r"weights_only|pickle|torch\.load|unsafe|trust_remote_code", re.IGNORECASE)
ONLY_SAFETENSORS = "only safetensors weights are read"


class ArtifactError(ValueError):
    """A trained artifact (weights file, step folder, bundle) cannot be used; the message is
    one line naming the file and what is wrong."""


def _error(path: str | os.PathLike, problem: str) -> ArtifactError:
    return ArtifactError(f"{path}: {' '.join(str(problem).split())}")


def one_line(exc: BaseException) -> str:
    """An exception's first line, at most 300 characters; any advice to load unsafely (a
    library's 'weights_only=False' hint) replaced by the rule here."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0][:300] if lines else type(exc).__name__
    if UNSAFE_ADVICE.search(text):
        return f"not in a format this program reads ({ONLY_SAFETENSORS})"
    return text


def shape_text(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


# ------------------------------------------------------------------ JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key '{key}' given twice")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: bytes | str) -> Any:
    """Strict JSON: no key given twice, no NaN or Infinity. Raises ValueError."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of an artifact (strict, at most ``limit`` bytes, a regular file).
    Raises ArtifactError."""
    path = Path(path)
    size = _regular_size(path)
    if size > limit:
        raise _error(path, f"{size} bytes, more than the {limit} a JSON file here may have")
    try:
        return parse_json(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _error(path, f"not valid JSON ({one_line(exc)})") from None


def _regular_size(path: Path) -> int:
    """The size of a regular file (symlinks followed); refuses anything else without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(path, "missing" + _pickle_hint(path)) from None
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _error(path, "not a regular file")
    return st.st_size


def _pickle_hint(path: Path) -> str:
    """Where a safetensors file is missing but a pickle-format file of the same stem is there."""
    if path.suffix != ".safetensors" or not path.parent.is_dir():
        return ""
    stem = path.name[: -len(".safetensors")]
    found = sorted(p.name for p in path.parent.iterdir() if p.suffix in PICKLE_SUFFIXES and (p.stem == stem or stem in p.stem))
    return f"; the folder holds {found[0]} instead: {ONLY_SAFETENSORS}" if found else ""


# ------------------------------------------------------------------ the COMPLETE manifest


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/COMPLETE``: every file under ``folder`` with its size and sha256 (the
    format of the trainer's step folders). Returns its path."""
    from fla_ds.atomic import atomic_write_json

    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    return atomic_write_json(folder / MANIFEST, {"files": files})


@dataclass(frozen=True)
class VerifiedFolder:
    """A folder whose manifest held: ``files`` are the relative names it lists."""

    path: Path
    files: frozenset[str]

    def listed_under(self, part: str) -> list[str]:
        """Listed names in the sub-folder (or the file) ``part``, sorted."""
        return sorted(n for n in self.files if n == part or n.startswith(part + "/"))


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _manifest_entries(marker: Path) -> dict[str, dict]:
    data = read_json(marker)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise _error(marker, "has no 'files' table")
    for name, facts in files.items():
        parts = PurePosixPath(name).parts
        if (not name or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts)
                or PurePosixPath(name).as_posix() != name):
            raise _error(marker, f"lists '{name}', which is not a plain path inside the folder")
        if (not isinstance(facts, dict) or not isinstance(facts.get("bytes"), int) or isinstance(facts.get("bytes"), bool)
                or facts["bytes"] < 0 or not isinstance(facts.get("sha256"), str) or not _HEX64.match(facts["sha256"])):
            raise _error(marker, f"the entry of '{name}' is not {{bytes, sha256}}")
    return files


def verify_folder(folder: str | os.PathLike, hash_training_state: bool = False, hashes: bool = True) -> VerifiedFolder:
    """Check ``folder`` against its ``COMPLETE`` manifest (module docstring, rule 1): every
    listed file present, regular, inside the folder, of its size and sha256 (files under
    ``engine/`` only by size unless ``hash_training_state``; every file only by size when
    ``hashes`` is False: a quick look); no unlisted file in a sub-folder that holds listed
    ones. Raises ArtifactError naming the offending file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _error(folder, "not a folder")
    marker = folder / MANIFEST
    if not marker.exists():
        raise _error(folder, f"no {MANIFEST} manifest: not a complete checkpoint or bundle (interrupted while saving, "
                             "or a bundle from before manifests: run fla-ds export again)")
    files = _manifest_entries(marker)
    root = folder.resolve()
    for name, facts in files.items():
        path = folder / name
        size = _regular_size(path)
        try:
            path.resolve().relative_to(root)
        except ValueError:
            raise _error(path, "a link pointing outside the folder") from None
        if size != facts["bytes"]:
            raise _error(path, f"{size} bytes, {MANIFEST} lists {facts['bytes']} (damaged or replaced)")
        hashed = hashes and (hash_training_state or PurePosixPath(name).parts[0] != TRAINING_STATE)
        if hashed and sha256_file(path) != facts["sha256"]:
            raise _error(path, f"content differs from its sha256 in {MANIFEST} (damaged or replaced)")
    sealed = {PurePosixPath(n).parent.as_posix() for n in files if "/" in n}
    for sub in sorted(sealed):
        for path in sorted((folder / sub).iterdir()):
            name = f"{sub}/{path.name}"
            if not path.name.startswith(".") and not path.is_dir() and name not in files:
                raise _error(path, f"not listed in {marker} (added after the folder was saved)")
    return VerifiedFolder(folder, frozenset(files))


# ------------------------------------------------------------------ safetensors


def _not_safetensors(head: bytes) -> str | None:
    """What a file that cannot be safetensors is, from its first bytes."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a Python pickle, not a safetensors file ({ONLY_SAFETENSORS}; it was not unpickled)"
    if head[:4] == b"PK\x03\x04":
        return f"a zip archive (a torch.save file?), not a safetensors file ({ONLY_SAFETENSORS})"
    return None


def check_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file without reading its tensor data: ``{name: (dtype, shape)}``.

    Refused, each by name (ArtifactError): not a regular file; a pickle or zip; a header too
    large or reaching past the end; a header that is not strict JSON (a key given twice
    included); a tensor whose shape and dtype need other than the bytes its ``data_offsets``
    span; tensors that overlap, leave gaps, or end before or after the file does (truncated);
    and whatever else the ``safetensors`` library itself refuses."""
    path = Path(path)
    size = _regular_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if (kind := _not_safetensors(head)) is not None:
            raise _error(path, kind)
        if len(head) < 8:
            raise _error(path, f"truncated: {size} bytes, not even a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise _error(path, f"header of {length} bytes is too large (at most {MAX_HEADER_BYTES}): not a safetensors file")
        if 8 + length > size:
            raise _error(path, f"truncated: the header claims {length} bytes, the file has {size - 8} after the length")
        raw = f.read(length)
    try:
        header = parse_json(raw)
    except (ValueError, RecursionError) as exc:
        raise _error(path, f"safetensors header is not valid JSON ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise _error(path, "safetensors header is not a JSON object")
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _error(path, "safetensors __metadata__ is not a table of strings")
            continue
        tensors[name] = _tensor_entry(path, name, info)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    data = size - 8 - length
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"starts at byte {begin}, leaving a gap after byte {at}"
            raise _error(path, f"tensor '{name}' {what} (the header does not describe the data)")
        at = end
    if at > data:
        raise _error(path, f"truncated: the header places {at} bytes of tensor data, the file holds {data}")
    if at < data:
        raise _error(path, f"{data - at} bytes after the last tensor (the header does not describe the data)")
    _library_check(path)
    return tensors


def _tensor_entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _error(path, f"tensor '{name}': the header entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise _error(path, f"tensor '{name}': unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _error(path, f"tensor '{name}': shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _error(path, f"tensor '{name}': data_offsets {offsets!r} are not [begin, end]")
    numel = 1
    for d in shape:
        numel *= d
    need_bits = numel * DTYPE_BITS[dtype]
    span = offsets[1] - offsets[0]
    if need_bits != span * 8:
        need = f"{need_bits // 8}" if need_bits % 8 == 0 else f"{need_bits / 8}"
        raise _error(path, f"tensor '{name}': the header's shape {shape_text(shape)} of {dtype} needs {need} bytes, "
                           f"its data_offsets span {span} (the header does not match the data)")
    return dtype, tuple(shape)


def _library_check(path: Path) -> None:
    """The safetensors library's own header validation (the last word on the format)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _error(path, f"not a valid safetensors file ({one_line(exc)})") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, after ``check_safetensors``. Raises
    ArtifactError naming the file for anything that is not an intact safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _error(path, f"cannot be read as safetensors ({one_line(exc)})") from None


def _first_mismatch(expected: dict[str, tuple], found: dict[str, tuple], order: list[str]) -> str | None:
    """The first key (in ``order``) missing, of another shape, or unexpected, in words."""
    for key in order:
        if key not in found:
            return f"'{key}' is missing (the model expects {shape_text(expected[key])})"
        if tuple(found[key]) != tuple(expected[key]):
            return (f"'{key}' has shape {shape_text(found[key])} in the file, the model expects {shape_text(expected[key])} "
                    "(weights of another model size?)")
    for key in sorted(found):
        if key not in expected:
            return f"unexpected tensor '{key}' {shape_text(found[key])} (the model has no such weight)"
    return None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``state`` (read from ``path``) into ``module`` strictly. Raises ArtifactError naming
    ``path`` and the first missing, unexpected or differently shaped key, with both shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problem = _first_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()}, list(expected))
    if problem is not None:
        raise _error(path, problem)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _error(path, f"does not fit the model ({one_line(exc)})") from None


# ------------------------------------------------------------------ Hugging Face folders


def check_hf_folder(folder: str | os.PathLike, config_name: str, weights_stem: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Check a Hugging Face folder before peft or transformers reads it: no pickle-format
    weights, ``config_name`` strict JSON, ``<weights_stem>.safetensors`` (or its shard index
    and every shard it names) present and each passing ``check_safetensors``. Returns
    ``{tensor: (file, shape)}``. Raises ArtifactError naming the offending file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _error(folder, "missing (not a folder)")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _error(pickles[0], f"pickle-format weights: {ONLY_SAFETENSORS} (the file was not loaded)")
    if not isinstance(read_json(folder / config_name), dict):
        raise _error(folder / config_name, "not a JSON object")
    index = folder / f"{weights_stem}.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise _error(index, "has no weight_map of file names")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors")]
        if bad:
            raise _error(index, f"names '{bad[0]}', which is not a safetensors file in the folder")
        files = [folder / n for n in names]
    else:
        files = [folder / f"{weights_stem}.safetensors"]
    tensors: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        for name, (_, shape) in check_safetensors(path).items():
            tensors[name] = (path, shape)
    return tensors


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Hugging Face's load reports, progress bars and warnings off while an artifact loads: the
    checks here say what is wrong, in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def hf_errors(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Run a peft/transformers load quietly; what it raises becomes one ArtifactError line
    naming ``folder`` (any advice to load unsafely replaced)."""
    from safetensors import SafetensorError

    try:
        with quiet_hf():
            yield
    except ArtifactError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise _error(folder, f"{what} cannot be loaded: {one_line(exc)}") from None


def load_pretrained(model_cls, folder: str | os.PathLike, **kwargs):
    """``model_cls.from_pretrained(folder)`` for a trained artifact folder (a merged model,
    mBART): ``check_hf_folder`` first, safetensors only, and any missing, unexpected or
    mismatched weight refused (transformers would initialise it at random). Raises
    ArtifactError."""
    folder = Path(folder)
    tensors = check_hf_folder(folder, "config.json", "model")
    with hf_errors(folder, "the model"):
        model, info = model_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, ignore_mismatched_sizes=True,
                                                output_loading_info=True, **kwargs)
    for key, in_file, in_model in sorted(info.get("mismatched_keys") or []):
        raise _error(tensors.get(key, (folder,))[0], f"'{key}' has shape {shape_text(in_file)} in the file, the model expects "
                                                     f"{shape_text(in_model)} (weights of another model size?)")
    for key in sorted(info.get("missing_keys") or []):
        raise _error(folder, f"'{key}' is missing from the weights")
    for key in sorted(info.get("unexpected_keys") or []):
        raise _error(tensors.get(key, (folder,))[0], f"unexpected tensor '{key}' (the model has no such weight)")
    return model


ADAPTER_CONFIG, ADAPTER_STEM = "adapter_config.json", "adapter_model"


def adapter_shapes(folder: Path, base_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (names as peft saves them) and shapes that ``folder``'s adapter
    config gives on the base model: both built on the meta device, no weight read."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    with hf_errors(base_path, "the base model's config"):
        config = AutoConfig.from_pretrained(str(base_path), local_files_only=True)
    with hf_errors(folder, "the adapter config"):
        peft_config = PeftConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def check_adapter(folder: str | os.PathLike, base_path: str | os.PathLike) -> None:
    """A LoRA adapter folder before peft reads it: ``check_hf_folder``, then its tensors
    exactly those (names and shapes) its config gives on the base model at ``base_path``.
    Raises ArtifactError naming the weights file and the first offending key."""
    folder = Path(folder)
    found = {k: shape for k, (_, shape) in check_hf_folder(folder, ADAPTER_CONFIG, ADAPTER_STEM).items()}
    expected = adapter_shapes(folder, base_path)
    problem = _first_mismatch(expected, found, sorted(expected))
    if problem is not None:
        raise _error(folder / f"{ADAPTER_STEM}.safetensors", problem)


def load_adapter(base_path: str | os.PathLike, folder: str | os.PathLike, load_base: Callable[[], torch.nn.Module], **kwargs):
    """``PeftModel.from_pretrained(load_base(), folder, **kwargs)`` after ``check_adapter``
    (so a bad adapter fails before the base model loads). Raises ArtifactError."""
    from peft import PeftModel

    check_adapter(folder, base_path)
    base = load_base()
    with hf_errors(folder, "the adapter"):
        return PeftModel.from_pretrained(base, str(folder), **kwargs)

