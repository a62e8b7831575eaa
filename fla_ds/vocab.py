"""The trimmed vocabulary of stage 1: the stage-2 tokenizer, cut down to the corpus.

FLa-LLM's lightweight translation transformer uses the language model's tokenizer with its
vocabulary trimmed to the tokens the training texts use: the same segmentation as stage 2,
but an output layer of a few thousand rows instead of ~50 000. ``vocab.json`` maps each new
id to the tokenizer's original id; new ids 0..3 are PAD, BOS, EOS, UNK.

    fla-ds vocab --tokenizer PATH --shards DIR --out DIR      (writes DIR/vocab.json)

The texts come from the shards' ``.json`` members only; frame packs are skipped unread and
nothing is ever unpickled. The file is deterministic: the same tokenizer, shards and paths
give byte-identical bytes (ids ascending, no timestamps, sorted keys).

Two trimmed vocabularies share one core, ``IdMap`` (new id <-> the tokenizer's original id):
``TrimmedVocab`` is stage 1's, a vocabulary of its own for a model trained from scratch
(specials laid out as new ids 0..3, the tokenizer inside, text in and out, ``vocab.json``);
a bare ``IdMap`` (``id_map.json``) is what a pretrained model whose embedding table was cut
to the corpus needs (``fla_ds.model.mbart.trim_mbart_vocab``): the kept rows stay in the
tokenizer's order, so the model's own special ids keep their meaning once remapped.

A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) splits an umlaut into byte tokens;
a text decodes back only if every token it uses is kept. Since the vocabulary is made of
exactly the tokens the training texts use, every training text must round-trip, and the
build records how many do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from fla_ds.atomic import atomic_write_text
from fla_ds.shards.format import ShardFormatError, iter_raw_samples
from fla_ds.shards.index import load_index

VOCAB_VERSION = 1
SPECIALS = ("pad", "bos", "eos", "unk")
"""New ids 0..3, in this order, whatever ids the tokenizer gives them."""
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
)
"""Files that define a tokenizer (model weights are left out of its hash)."""
MAX_FAILURES_KEPT = 5
ID_MAP_NAME = "id_map.json"

log = logging.getLogger(__name__)


class VocabError(ValueError):
    """A vocabulary that does not fit its tokenizer, or cannot be built; one line."""


# ------------------------------------------------------------------------------ tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder; never reaches for a model hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """One hash over the tokenizer's defining files (name and bytes), for provenance."""
    folder = Path(path)
    digest = hashlib.sha256()
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        raise VocabError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    for name in sorted(found):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Original ids without the tokenizer's own specials: the trimmed vocab adds BOS/EOS itself."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def special_original_ids(tokenizer) -> list[int]:
    """The tokenizer's own id for pad, bos, eos, unk; -1 where it has none."""
    ids = []
    for name in SPECIALS:
        value = getattr(tokenizer, f"{name}_token_id", None)
        ids.append(-1 if value is None else int(value))
    return ids


# ------------------------------------------------------------------------------ the vocabulary


class IdMap:
    """New ids <-> original (tokenizer) ids of a vocabulary cut down to a corpus:
    ``kept[new] = original``.

    ``unk_id``: the new id an original id outside the kept ones becomes (None: such an id is
    an error). ``looked_up_from``: only new ids from this one on are found by original id
    (``TrimmedVocab`` keeps its specials out of the lookup: texts are tokenized without them,
    and a tokenizer may give two specials one id)."""

    def __init__(self, kept: Sequence[int], unk_id: int | None = None, looked_up_from: int = 0):
        self.kept: list[int] = [int(i) for i in kept]
        self.unk_id = unk_id
        self._new_id = {orig: new for new, orig in enumerate(self.kept) if new >= looked_up_from}

    @classmethod
    def of_kept(cls, kept: Sequence[int], unk_original: int | None = None) -> IdMap:
        """The map of ascending original ids ``kept`` (a cut embedding table), whose UNK is the
        tokenizer's own (``unk_original``), if kept."""
        kept = [int(i) for i in kept]
        return cls(kept, kept.index(unk_original) if unk_original in kept else None)

    @property
    def size(self) -> int:
        return len(self.kept)

    def from_original(self, ids: Iterable[int]) -> list[int]:
        """New ids; an id outside the kept ones becomes UNK (a KeyError without one)."""
        out = []
        for i in ids:
            new = self._new_id.get(int(i), self.unk_id)
            if new is None:
                raise KeyError(f"token id {int(i)} is not in the trimmed vocabulary, which has no UNK")
            out.append(new)
        return out

    def to_original(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        """The tokenizer's ids of new ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.kept[int(i)] for i in ids]

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/id_map.json``: the kept original ids and the original id of UNK."""
        path = Path(folder) / ID_MAP_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        unk = self.kept[self.unk_id] if self.unk_id is not None else None
        path.write_text(json.dumps({"kept": self.kept, "unk_original": unk}) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> IdMap | None:
        """The map saved in ``folder``, or None where there is none (an untrimmed model)."""
        path = Path(folder) / ID_MAP_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text("utf-8"))
        return cls.of_kept(data["kept"], data.get("unk_original"))


class TrimmedVocab(IdMap):
    """Stage 1's vocabulary: an ``IdMap`` whose new ids 0..3 are PAD, BOS, EOS, UNK (original
    -1 where the tokenizer has none), with the tokenizer: encodes text into new ids and
    decodes them back through the full tokenizer."""

    def __init__(self, data: dict, tokenizer):
        super().__init__(data["original_ids"], unk_id=SPECIALS.index("unk"), looked_up_from=len(SPECIALS))
        self.data = data
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> TrimmedVocab:
        """``path``: vocab.json or its folder. ``tokenizer_path`` overrides the one recorded
        (the vocab moved to another machine); the tokens must still match."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        if not path.is_file():
            raise VocabError(f"{path} does not exist: build it first (fla-ds vocab)")
        data = json.loads(path.read_text("utf-8"))
        tokenizer = load_tokenizer(tokenizer_path or data["tokenizer"])
        check_tokens(data, tokenizer, path)
        return cls(data, tokenizer)

    @property
    def original_ids(self) -> list[int]:
        return self.kept

    @property
    def pad_id(self) -> int:
        return SPECIALS.index("pad")

    @property
    def bos_id(self) -> int:
        return SPECIALS.index("bos")

    @property
    def eos_id(self) -> int:
        return SPECIALS.index("eos")

    def encode(self, text: str) -> list[int]:
        """New ids of ``text``, without BOS/EOS; tokens outside the trimmed vocab become UNK."""
        return self.from_original(tokenize(self.tokenizer, [text])[0])

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """(B, L) LongTensor of BOS ids EOS, right-padded with PAD to the longest row;
        rows longer than ``max_len`` lose their tail but keep EOS."""
        if max_len < 3:
            raise ValueError(f"max_len {max_len} leaves no room for a token between BOS and EOS")
        rows = [[self.bos_id] + self.from_original(ids)[: max_len - 2] + [self.eos_id] for ids in tokenize(self.tokenizer, texts)]
        width = max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of new ids: stops at the first EOS (generated rows run on past it), drops the
        other specials, and lets the full tokenizer join the bytes."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        original = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                original.append(self.kept[i])
        # No clean-up: it would glue " ." and " ," onto words and break the round trip.
        return self.tokenizer.decode(original, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode_batch(self, rows: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in rows]

    def to_original(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        """The tokenizer's ids for new ids (stage 2 speaks the full vocabulary)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = super().to_original(ids)
        if -1 in out:
            missing = sorted({SPECIALS[int(i)] for i in ids if self.kept[int(i)] == -1})
            raise VocabError(f"the tokenizer has no {', '.join(missing)} token to map to")
        return out


def check_tokens(data: dict, tokenizer, where: os.PathLike | str) -> None:
    """The ids must still name the same tokens: a different tokenizer would silently train
    on, and decode into, other words."""
    kept = data["original_ids"][len(SPECIALS):]
    if tokenizer.convert_ids_to_tokens(kept) != data["tokens"][len(SPECIALS):]:
        raise VocabError(f"{where}: the tokenizer {getattr(tokenizer, 'name_or_path', '')} is not the one this vocabulary was built with")


# ------------------------------------------------------------------------------ building


def build_vocab(tokenizer_path: str | os.PathLike, texts: Iterable[str], tokenizer=None) -> dict:
    """The vocab.json content for ``texts`` (pass ``tokenizer`` to skip loading it again)."""
    texts = list(texts)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
    specials = special_original_ids(tokenizer)
    counts = Counter(i for ids in tokenize(tokenizer, texts) for i in ids)
    used = sorted(i for i in counts if i not in specials)
    original_ids = specials + used
    data = {
        "version": VOCAB_VERSION,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer_path),
        "tokenizer_size": len(tokenizer),
        "specials": {name: i for i, name in enumerate(SPECIALS)},
        "original_ids": original_ids,
        "tokens": [None if i < 0 else tokenizer.convert_ids_to_tokens(i) for i in original_ids],
        "counts": [0] * len(SPECIALS) + [counts[i] for i in used],
    }
    data["round_trip"] = round_trip_report(TrimmedVocab(data, tokenizer), texts)
    return data


def round_trip_report(vocab: TrimmedVocab, texts: Sequence[str]) -> dict:
    failures = [t for t in texts if vocab.decode(vocab.encode(t)) != t]
    return {"texts": len(texts), "exact": len(texts) - len(failures), "failures": failures[:MAX_FAILURES_KEPT]}


def iter_shard_texts(shard: str, payload: str = "frames", samples: int | None = None) -> Iterator[str]:
    """Texts of one shard in tar order, from the .json members alone, read by the loader's
    reader (fla_ds.shards.format.iter_raw_samples) with its rules: a member fla_ds does not
    write (.pyd, .pickle, a link, ...) refuses the shard, payloads are checked but skipped
    unread, and with ``samples`` (the index's count) the tar must hold exactly that many.
    Raises ShardFormatError."""
    for raw in iter_raw_samples(shard, payload=payload, samples=samples, read_payload=False):
        yield parse_text(shard, f"{raw['__key__']}.json", raw["json"])


def parse_text(shard: str, fname: str, data: bytes) -> str:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{shard}: member '{fname}' is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("text"), str):
        raise ShardFormatError(f"{shard}: member '{fname}' has no text")
    return meta["text"]


def shard_texts(shards_dir: str | os.PathLike, split: str = "train") -> tuple[list[str], dict]:
    """Every text of a split, in index order, and a record of which shards they came from.
    Raises IndexFormatError (index missing, malformed, inconsistent, or a split with no
    samples) and ShardFormatError (a hostile or damaged shard)."""
    entry = load_index(shards_dir, split)
    payload = "features" if entry["kind"] == "features" else "frames"
    texts = []
    for shard in entry["shards"]:
        texts.extend(iter_shard_texts(str(Path(shards_dir) / shard["name"]), payload, shard["samples"]))
    fingerprint = hashlib.sha256("".join(s["sha256"] for s in entry["shards"]).encode()).hexdigest()
    return texts, {"dir": str(shards_dir), "split": entry["split"], "samples": len(texts), "sha256": fingerprint}


def build_vocab_files(tokenizer_path: str | os.PathLike, shards_dir: str | os.PathLike, out_dir: str | os.PathLike, split: str = "train") -> Path:
    """``fla-ds vocab``: write ``out_dir/vocab.json`` (or ``out_dir`` itself if it ends in
    .json) from the texts of one split of the shards; returns the file."""
    texts, source = shard_texts(shards_dir, split)
    if not texts:
        raise VocabError(f"{shards_dir}: split '{split}' has no texts")
    data = build_vocab(tokenizer_path, texts)
    data["shards"] = source
    report = data["round_trip"]
    if report["exact"] != report["texts"]:
        log.warning("%d of %d training texts do not decode back exactly, e.g. %r", report["texts"] - report["exact"], report["texts"], report["failures"][0])
    out = Path(out_dir)
    path = out if out.suffix == ".json" else out / "vocab.json"
    return atomic_write_text(path, vocab_json(data))


def vocab_json(data: dict) -> str:
    """One top-level key per line: the id lists stay on one line each instead of one number
    per line, and the text stays byte-identical for identical content."""
    lines = [f" {json.dumps(key)}: {json.dumps(data[key], ensure_ascii=False, sort_keys=True)}" for key in sorted(data)]
    return "{\n" + ",\n".join(lines) + "\n}\n"
