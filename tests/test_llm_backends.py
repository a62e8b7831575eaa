"""Stage-2 backends on CPU with the real libraries: a tiny random LLaMA loaded in 4-bit NF4 by
bitsandbytes with peft LoRA (QLoRA), and a tiny random mBART, both saved to folders and
loaded back through the code under test (T5: tests/test_t5_backend.py); the registry.
Includes the regression test for bitsandbytes' in-place CPU repacking (see
``keep_4bit_weights_unpacked``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_MBART_LANG, save_tiny_llama, save_tiny_mbart, sync_counter
from transformers import MBartForConditionalGeneration

from fla_ds.model.llm import VisualLLM, load_decoder_only, save_adapter
from fla_ds.model.loss import IGNORE_INDEX
from fla_ds.model.mbart import VisualMBart, load_encoder_decoder, trim_mbart_vocab
from fla_ds.model.projector import Projector
from fla_ds.vocab import IdMap

bnb = pytest.importorskip("bitsandbytes")

FEATURE_DIM = 16
TEXTS = ["am tag scheint die sonne", "morgen früh gibt es nebel"]
PROMPT = "übersetze ins deutsche:"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads cost more than they save. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def mbart_dir(tmp_path_factory) -> Path:
    return save_tiny_mbart(tmp_path_factory.mktemp("tiny-mbart"))


def clips(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature clips of 7 and 4 steps (the second padded), as the frozen encoder gives them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    return torch.randn(2, 7, FEATURE_DIM, generator=g) * mask.unsqueeze(-1), mask


def visual_llm(llama_dir: Path, qlora: bool, dtype: torch.dtype, **lora) -> VisualLLM:
    torch.manual_seed(0)
    llm, tokenizer = load_decoder_only(llama_dir, qlora=qlora, dtype=dtype, **lora)
    return VisualLLM(llm, tokenizer, Projector(FEATURE_DIM, llm.config.hidden_size).to(dtype), PROMPT)


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the two clips; per-token losses, one per step."""
    features, mask = clips()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss_sum, n_tokens = model(features, mask, TEXTS)
        (loss_sum / n_tokens).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss_sum / n_tokens).item())
    return losses


def linear4bit_weights(model: nn.Module) -> dict[str, tuple[torch.dtype, torch.Size, torch.Tensor]]:
    """dtype, shape and raw bytes of every 4-bit weight (the packed codes, read as bf16, hold
    NaN patterns, which never compare equal)."""
    return {n: (m.weight.dtype, m.weight.shape, m.weight.data.view(torch.uint8).clone()) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


# ------------------------------------------------------------------------------ decoder-only, QLoRA


def test_qlora_quantizes_every_base_linear_and_trains_only_lora_and_projector(llama_dir):
    model = visual_llm(llama_dir, qlora=True, dtype=torch.bfloat16)
    base_linears = {n: m for n, m in model.llm.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n and not n.endswith("lm_head")}
    assert len(base_linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears.values())
    assert all(m.support_avx512bf16_for_cpu is False for m in base_linears.values())
    assert {m.weight.quant_state.quant_type for m in base_linears.values()} == {"nf4"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("projector.") for n in trainable)
    assert {n for n in trainable if n.startswith("projector.")} == {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias"}
    # ZeRO-3 + bf16 wants one dtype: prepare_model_for_kbit_training's fp32 upcasts are undone,
    # and the 4-bit weights are stored as bf16 too.
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_qlora_loss_falls_and_generation_recovers_the_texts(llama_dir):
    model = visual_llm(llama_dir, qlora=True, dtype=torch.bfloat16)
    losses = train(model, steps=40)
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    out = model.generate(*clips(), max_new_tokens=12, num_beams=3)
    assert out == TEXTS  # overfit: training and generation lay the sequence out alike


def test_labels_cover_only_target_tokens_and_eos(llama_dir):
    model = visual_llm(llama_dir, qlora=False, dtype=torch.float32, gradient_checkpointing=False).eval()
    features, mask = clips()
    tokenizer = model.tokenizer
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
    with torch.no_grad():
        loss_sum, n_tokens = model(features, mask, TEXTS)
        assert int(n_tokens) == expected
        # The same prompt, longer: not a single label more.
        longer = VisualLLM(model.llm, tokenizer, model.projector, PROMPT + " " + PROMPT)
        assert int(longer(features, mask, TEXTS)[1]) == expected
        # The loss is exactly the cross-entropy on target and EOS positions of the full logits
        # (checks the logits_to_keep shortcut's alignment).
        batch = model.build_batch(features, mask, model.target_ids(TEXTS))
        logits = model.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        labels = batch.labels[:, 1:]
        counted = labels != IGNORE_INDEX
        assert torch.allclose(loss_sum, F.cross_entropy(logits[:, :-1][counted], labels[counted], reduction="sum"), rtol=1e-5)
        # Labelled positions hold exactly the target ids + EOS, right-aligned.
        eos = tokenizer.eos_token_id
        for row, text in zip(batch.labels, TEXTS):
            assert row[row != IGNORE_INDEX].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]


def sync_sites(model: VisualLLM, features: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Where a training forward + backward makes the host wait for the device: the innermost
    fla_ds or library module of each sync op (``helpers.sync_counter``)."""
    sites: list[str] = []

    def on_sync(op: str) -> None:
        frames = [f.filename for f in traceback.extract_stack() if "/fla_ds/" in f.filename or "site-packages" in f.filename]
        sites.append(next((f for f in reversed(frames) if "/torch/" not in f), "torch").split("/")[-1])

    model.train()
    with sync_counter(on_sync):
        loss_sum, n_tokens = model(features, mask, TEXTS[: len(features)])
        (loss_sum / n_tokens).backward()
    return sites


@pytest.mark.parametrize("qlora", [True, False])
def test_a_training_step_reads_no_device_value_to_lay_out_its_inputs(llama_dir, qlora):
    """Stage 2's forward and backward from the loader's host mask: the layout (lengths, padding,
    labels) is worked out on the host and the loss counts tokens with ignore_index, so fla_ds
    reads nothing from the device (counted as tests/test_hot_paths.py counts stage 1). What is
    left is transformers' own mask logic (transformers 5.x masking_utils): it reads the mask to
    decide whether SDPA may run plain causal attention, twice with padded rows, once without."""
    dtype = torch.bfloat16 if qlora else torch.float32
    model = visual_llm(llama_dir, qlora=qlora, dtype=dtype)
    features, mask = clips()
    assert sync_sites(model, features.to(dtype), mask) == ["masking_utils.py"] * 2
    assert sync_sites(model, features[:1].to(dtype), mask[:1]) == ["masking_utils.py"]


def test_the_host_layout_gives_the_masked_selection(llama_dir):
    """Cutting each row's features at its length (host ints) is the boolean selection it
    replaced, and a mask whose real positions do not come first is refused, not misread."""
    model = visual_llm(llama_dir, qlora=False, dtype=torch.float32, gradient_checkpointing=False).eval()
    features, mask = clips()
    batch = model.build_batch(features, mask, model.target_ids(TEXTS))
    visual = model.projector(features)
    for i in range(2):
        real = batch.embeds[i][batch.attention_mask[i].bool()]
        assert torch.equal(real[len(model.head_ids) : len(model.head_ids) + int(mask[i].sum())], visual[i][mask[i]])
    holes = mask.clone()
    holes[1, 1] = False
    with pytest.raises(ValueError, match="real positions must come first"):
        model.build_batch(features, holes, None)


def test_left_padding_leaves_each_clip_as_if_alone(llama_dir):
    """The shorter row is padded on the left only, and neither its loss nor its generation
    depends on its batch mate (mask + position ids right)."""
    model = visual_llm(llama_dir, qlora=False, dtype=torch.float32, gradient_checkpointing=False)
    train(model, steps=15)
    model.eval()
    features, mask = clips()
    assert model.tokenizer.padding_side == "left"
    batch = model.build_batch(features, mask, None)
    assert batch.attention_mask[0].all() and not batch.attention_mask[1, :3].any() and batch.attention_mask[1, 3:].all()
    assert batch.position_ids[1, 3:].tolist() == list(range(batch.attention_mask[1].sum()))
    with torch.no_grad():
        together = model(features, mask, TEXTS)[0]
        alone = sum(model(features[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())], TEXTS[i : i + 1])[0] for i in range(2))
    assert torch.allclose(together, alone, rtol=1e-4)
    batched = model.generate(features, mask, max_new_tokens=10, num_beams=2)
    lengths = [int(mask[i].sum()) for i in range(2)]
    single = [model.generate(features[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]], max_new_tokens=10, num_beams=2)[0] for i in range(2)]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fla_ds.model.llm import VisualLLM, load_for_inference
    from fla_ds.model.projector import Projector
    base, adapter, projector_dir, prompt, out = sys.argv[1:6]
    torch.set_num_threads(1)
    llm, tokenizer = load_for_inference(base, adapter, qlora=True, dtype=torch.bfloat16)
    model = VisualLLM(llm, tokenizer, Projector.load(projector_dir, dtype=torch.bfloat16), prompt).eval()
    inputs = torch.load(out + ".inputs.pt")
    with torch.no_grad():
        logits = llm(input_ids=inputs["ids"]).logits
    texts = model.generate(inputs["features"], inputs["mask"], max_new_tokens=12, num_beams=3)
    torch.save({"logits": logits, "texts": texts}, out)
    """
)


def test_generate_then_save_then_reload_in_a_fresh_process_gives_the_same_model(llama_dir, tmp_path):
    """THE REGRESSION TEST for bitsandbytes' CPU repacking: an eval, no-grad pass (generate)
    must leave the 4-bit weights untouched, training afterwards must get the same gradients,
    and the adapter saved afterwards must reload (fresh process, no DeepSpeed) into a model
    with the same outputs as the one in memory."""
    model = visual_llm(llama_dir, qlora=True, dtype=torch.bfloat16, lora_dropout=0.0)
    train(model, steps=10)  # LoRA B starts at zero: make the adapter matter
    features, mask = clips()

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        loss_sum, n_tokens = model(features, mask, TEXTS)
        (loss_sum / n_tokens).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return grads

    before_weights, before_grads = linear4bit_weights(model), gradients()
    model.eval()
    texts = model.generate(features, mask, max_new_tokens=12, num_beams=3)
    after_weights = linear4bit_weights(model)
    for name, (dtype, shape, data) in before_weights.items():
        assert after_weights[name][:2] == (dtype, shape), f"{name} was repacked by generate"
        assert torch.equal(after_weights[name][2], data), name
    after_grads = gradients()
    assert before_grads.keys() == after_grads.keys()
    for name, grad in before_grads.items():
        assert torch.equal(after_grads[name], grad), f"gradient of {name} changed after generate"

    save_adapter(model, tmp_path / "adapter")
    model.projector.save(tmp_path / "projector")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    model.eval()
    with torch.no_grad():
        logits = model.llm(input_ids=ids).logits
    out = tmp_path / "reloaded.pt"
    torch.save({"ids": ids, "features": features, "mask": mask}, str(out) + ".inputs.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(llama_dir), str(tmp_path / "adapter"), str(tmp_path / "projector"), PROMPT, str(out)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=120)
    reloaded = torch.load(out)
    assert torch.allclose(reloaded["logits"], logits, atol=1e-5, rtol=0), (reloaded["logits"] - logits).abs().max()
    assert reloaded["texts"] == texts


def test_adapter_loads_with_plain_peft(llama_dir, tmp_path):
    """The saved folder is an ordinary peft adapter (no fla_ds needed to read it)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = visual_llm(llama_dir, qlora=False, dtype=torch.float32, gradient_checkpointing=False)
    train(model, steps=2)
    save_adapter(model, tmp_path / "adapter")
    # What a ZeRO-3 save passes: a gathered state dict of the whole VisualLLM.
    save_adapter(model, tmp_path / "from-state-dict", state_dict=model.state_dict())
    saved, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "from-state-dict"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 16
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    assert sum(".lora_A." in n for n, _ in plain.named_parameters()) == 2 * 7
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model.llm.eval()(input_ids=ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------ encoder-decoder


def visual_mbart(mbart_dir: Path, trim: bool = False) -> VisualMBart:
    torch.manual_seed(0)
    mbart, tokenizer = load_encoder_decoder(mbart_dir)
    vocab = None
    if trim:
        mbart, vocab = trim_mbart_vocab(mbart, tokenizer, TEXTS, keep_tokens=[TINY_MBART_LANG])
    return VisualMBart(mbart, Projector(FEATURE_DIM, mbart.config.d_model), tokenizer, vocab, tgt_lang=TINY_MBART_LANG)


def test_mbart_trains_fully_loss_falls_and_generation_recovers_the_texts(mbart_dir):
    model = visual_mbart(mbart_dir)
    assert all(p.requires_grad for p in model.parameters())
    losses = train(model, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    assert model.generate(*clips(), num_beams=3, max_new_tokens=12) == TEXTS


def test_mbart_counts_target_tokens_and_eos_and_smooths_labels(mbart_dir):
    model = visual_mbart(mbart_dir).eval()
    features, mask = clips()
    tokenizer = model.tokenizer
    with torch.no_grad():
        loss_sum, n_tokens = model(features, mask, TEXTS)
        assert int(n_tokens) == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
        decoder_ids, decoder_mask, labels = model.teacher_forcing(model.target_rows(TEXTS), features.device)
        lang = tokenizer.convert_tokens_to_ids(TINY_MBART_LANG)
        assert decoder_ids[:, 0].tolist() == [lang, lang]
        for ids, row in zip(decoder_ids, labels):
            n = int((row != IGNORE_INDEX).sum())
            assert ids[1:n].tolist() == row[: n - 1].tolist() and row[n - 1] == tokenizer.eos_token_id
        # Summed (1 - 0.2) NLL + 0.2 mean(-log p) over the counted positions only.
        embeds, enc_mask = model.encoder_inputs(features, mask)
        logits = model.mbart(inputs_embeds=embeds, attention_mask=enc_mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask).logits
        logp = logits.log_softmax(-1)
        counted = labels != IGNORE_INDEX
        nll = -logp[counted].gather(1, labels[counted].unsqueeze(1)).sum()
        expected = 0.8 * nll + 0.2 * (-logp[counted].mean(-1)).sum()
    assert torch.allclose(loss_sum, expected, rtol=1e-5)


def test_trimmed_mbart_keeps_the_pretrained_logits_of_kept_tokens(mbart_dir, tmp_path):
    original, tokenizer = load_encoder_decoder(mbart_dir)
    original.eval()
    trimmed, id_map = trim_mbart_vocab(load_encoder_decoder(mbart_dir)[0], tokenizer, TEXTS, keep_tokens=[TINY_MBART_LANG])
    trimmed.eval()
    assert id_map.size < len(tokenizer) and trimmed.config.vocab_size == id_map.size
    assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight  # still tied
    assert trimmed.final_logits_bias.shape == (1, id_map.size)
    words = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    src, tgt = words + [tokenizer.eos_token_id], [tokenizer.convert_tokens_to_ids(TINY_MBART_LANG)] + words
    kept = torch.tensor(id_map.kept)

    def trimmed_logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([id_map.from_original(src)]), decoder_input_ids=torch.tensor([id_map.from_original(tgt)])).logits

    with torch.no_grad():
        reference = original(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt])).logits[..., kept]
    assert torch.allclose(trimmed_logits(trimmed), reference, atol=1e-5)
    # Saved and reloaded (how a trimmed model reaches training), the same again.
    trimmed.save_pretrained(tmp_path / "trimmed")
    id_map.save(tmp_path / "trimmed")
    reloaded = MBartForConditionalGeneration.from_pretrained(tmp_path / "trimmed").eval()
    assert IdMap.load(tmp_path / "trimmed").kept == id_map.kept
    assert torch.allclose(trimmed_logits(reloaded), reference, atol=1e-5)
    # Specials keep mBART's low ids, word tokens move down; a dropped token reads as UNK.
    assert (reloaded.config.pad_token_id, reloaded.config.eos_token_id) == (1, 2)
    assert id_map.from_original(words) != words and id_map.to_original(id_map.from_original(words)) == words
    dropped = next(i for i in range(len(tokenizer)) if i not in set(id_map.kept))
    assert id_map.from_original([dropped]) == id_map.from_original([tokenizer.unk_token_id])


def test_trimmed_mbart_trains_and_decodes_through_the_original_tokenizer(mbart_dir):
    model = visual_mbart(mbart_dir, trim=True)
    losses = train(model, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    assert model.generate(*clips(), num_beams=3, max_new_tokens=12) == TEXTS


def test_mbart_refuses_clips_longer_than_its_positions_and_unknown_language_codes(mbart_dir):
    model = visual_mbart(mbart_dir)
    with pytest.raises(ValueError, match="xx_XX"):
        VisualMBart(model.mbart, model.projector, model.tokenizer, tgt_lang="xx_XX")
    too_long = torch.zeros(1, model.max_source_len + 1, FEATURE_DIM)
    with pytest.raises(ValueError, match="positions"):
        model(too_long, torch.ones(1, model.max_source_len + 1, dtype=torch.bool), TEXTS[:1])


# ------------------------------------------------------------------------------ projector


def test_projector_casts_features_and_round_trips(tmp_path):
    projector = Projector(FEATURE_DIM, 24, hidden=40).to(torch.bfloat16)
    features = torch.randn(2, 5, FEATURE_DIM)  # a float32 feature cache
    out = projector(features)
    assert out.shape == (2, 5, 24) and out.dtype == torch.bfloat16
    projector.save(tmp_path)
    again = Projector.load(tmp_path, dtype=torch.bfloat16)
    assert again.config() == {"in_dim": FEATURE_DIM, "out_dim": 24, "hidden": 40}
    assert torch.equal(again(features), out)


# ------------------------------------------------------------------------------ the registry


def test_every_registered_backend_is_one_module_satisfying_the_protocol():
    from fla_ds.backends import BACKENDS, Backend, get_backend
    from fla_ds.config import load_config

    assert set(BACKENDS) == {"decoder_only", "mbart", "t5"}
    folders = set()
    for name, module in BACKENDS.items():
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name and backend.__module__ == module
        assert backend.folder in backend.bundle_parts
        folders.add(backend.folder)
        assert load_config(None, [f"stage2.backend={name}"]).stage2.backend == name
    assert len(folders) == len(BACKENDS)  # each saves into its own folder
    with pytest.raises(ValueError, match="one of decoder_only, mbart, t5"):
        get_backend("gpt")


def test_no_module_outside_the_registry_names_a_backend():
    """Adding a backend is one module and one registry line: nothing else branches on names."""
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "fla_ds").rglob("*.py"))
                 for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
                 if "stage2.backend ==" in line or "s.backend ==" in line or ".backend == \"" in line]
    assert offenders == []
