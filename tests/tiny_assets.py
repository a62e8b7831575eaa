"""Tiny real assets for tests: a byte-level BPE tokenizer trained offline (GPT-2 style, as
SmolLM2's), and small synthetic corpora built into shards with the real builder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

TOKENIZER_TEXTS = [
    "am tag scheint die sonne über dem ganzen land",
    "im süden und osten regnet es häufig, später auch gewitter",
    "morgen früh gibt es nebel an den flüssen",
    "die temperaturen liegen zwischen null und fünfzehn grad",
    "im nordwesten weht ein frischer wind aus süd",
    "grüße aus köln, heiße tage und kühle nächte",
    "quantenphysik zebra yacht xylophon jodeln",
    "satz über das wetter",
]


def train_tiny_tokenizer(folder: Path, texts: Iterable[str] = TOKENIZER_TEXTS, vocab_size: int = 600) -> Path:
    """A byte-level BPE with BOS, EOS and UNK but no PAD, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


def synthetic_shards(root: Path, train: int = 24, dev: int = 8, size: int = 32, vocab_size: int = 12) -> Path:
    """The synthetic corpus, small, built into one shard folder (train and dev)."""
    from omegaconf import OmegaConf

    from fla_ds.config import load_config
    from fla_ds.corpus.synthetic import generate
    from fla_ds.shards import build_shards

    cfg = load_config(None, [f"synth.out={root / 'synth'}", f"synth.size={size}", f"synth.train={train}", f"synth.dev={dev}", "synth.test=2",
                             f"synth.vocab_size={vocab_size}", f"shards.out={root / 'shards'}", f"shards.short_side={size}", "shards.samples_per_shard=8"])
    generate(cfg.synth)
    for split in ("train", "dev"):
        build_shards(OmegaConf.merge(cfg, {"corpus": {"name": "synthetic", "root": cfg.synth.out, "split": split}}), progress_bar=False)
    return root / "shards"
