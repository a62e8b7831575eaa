"""What tests share (test modules never import one another): tiny real assets (a byte-level
BPE tokenizer trained offline, GPT-2 style as SmolLM2's; tiny random LLaMA, mBART, T5; small
synthetic corpora built into shards with the real builder), the tiny stage-1/stage-2
settings, and running fla_ds/train.py as a user would (under torchrun for several ranks)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

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

# A stage-1 model and loader small enough for CPU tests (2-layer Light-T, 28-pixel crops).
TINY_STAGE1 = [
    "visual.out_dim=32", "light_t.d_model=32", "light_t.heads=2", "light_t.encoder_layers=1", "light_t.decoder_layers=1",
    "light_t.ffn=64", "light_t.adapter_hidden=32", "light_t.max_target_tokens=16", "light_t.dropout=0.1",
    "train.micro_batch=2", "stream.num_workers=1", "augment.crop_size=28", "augment.keep_ratio=0.1", "augment.max_frames=6",
    "train.global_batch=4", "train.optimizer=adamw", "train.lr=3e-3", "train.log_every=1", "eval.beam_size=2",
    "eval.limit=4", "eval.max_new_tokens=8",
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


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer LLaMA (hidden 64) with the tiny tokenizer, saved as a Hugging Face
    folder so that the real ``from_pretrained`` path (4-bit quantisation included) runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    train_tiny_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # initializer_range 0.1, not 0.02: at width 64 the default keeps every logit so small that
    # even a model that has learnt its two test sentences stays near ln(vocab) in loss.
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    with torch.random.fork_rng():  # leaves the caller's random stream alone
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


TINY_MBART_LANG = "de_DE"


def save_tiny_mbart(folder: Path, texts: Iterable[str] = TOKENIZER_TEXTS, vocab_size: int = 600, seed: int = 0) -> Path:
    """A random mBART (d_model 32, 1 encoder + 1 decoder layer) with a byte-level BPE laid out
    like mBART's (<s>=0, <pad>=1, </s>=2, <unk>=3) plus a language code, saved as a folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MBartConfig, MBartForConditionalGeneration, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", TINY_MBART_LANG]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=[TINY_MBART_LANG]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = MBartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, scale_embedding=True,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        MBartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_t5(folder: Path, texts: Iterable[str] = TOKENIZER_TEXTS, vocab_size: int = 600, seed: int = 0) -> Path:
    """A random T5 (d_model 32, 1 encoder + 1 decoder layer, gated GELU as in mT5 and T5 v1.1)
    with a byte-level BPE laid out like T5's (<pad>=0, </s>=1, <unk>=2; no BOS), saved as a
    folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ running train.py

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "fla_ds" / "train.py")

TINY_STAGE2 = [
    "train.micro_batch=2", "stream.num_workers=1", "train.global_batch=4", "train.optimizer=adamw", "train.lr=3e-3",
    "stage2.projector_lr=3e-3", "stage2.lora_r=4", "stage2.lora_alpha=8", "stage2.prompt=übersetze bitte", "eval.max_new_tokens=8",
    "eval.beam_size=2", "eval.limit=4", "train.log_every=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: int, ranks: int, args: list[str]) -> list[str]:
    """The command a user runs: python fla_ds/train.py, or torchrun for several ranks."""
    if ranks == 1:
        return [sys.executable, TRAIN, "--stage", str(stage), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), TRAIN, "--stage", str(stage), *args]


def train_cmd(assets: dict, out: Path, ranks: int, *overrides: str) -> list[str]:
    """Stage 1 on ``assets`` (shards, tokenizer) with the tiny settings."""
    return launch(1, ranks, [f"stream.shards={assets['shards']}", f"train.tokenizer={assets['tokenizer']}", f"train.out={out}", *TINY_STAGE1, *overrides])


def stage2_cmd(assets: dict, out: Path, ranks: int, *overrides: str) -> list[str]:
    """Stage 2 on ``assets`` (stage1 run folder) with the tiny settings."""
    return launch(2, ranks, [f"stage2.encoder={assets['stage1']}", f"train.out={out}", *TINY_STAGE2, *overrides])


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def collect(stream, limit: int | None = None) -> list:
    """The batches of a ShardStream (the first ``limit``)."""
    out = []
    for batch in stream:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}
"""Ops whose result a GPU's host must wait for: reading a value (``item``, ``float``, ``int``,
``bool``), and results whose shape depends on the data (nonzero, masked_select)."""


def sync_counter(on_sync):
    """A torch dispatch mode calling ``on_sync(op name)`` for every op that would make the host
    wait for a GPU (``SYNC_OPS``, boolean-mask indexing). On a CPU nothing waits, but the same
    ops run, so counting them here is what a GPU would stall on. ``tolist`` is not an op: patch it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            boolean_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
            if name in SYNC_OPS or boolean_index:
                on_sync(name)
            return func(*args, **(kwargs or {}))

    return SyncCounter()
