"""The T5/mT5 backend (fla_ds/model/t5.py) on CPU with the real library: a tiny random T5 saved
to a folder, built and loaded back through the registry (``get_backend("t5")``), as the
stage does. The run under DeepSpeed, export and translate: tests/test_stage2.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_t5

from fla_ds.backends import get_backend
from fla_ds.config import load_config, save_resolved
from fla_ds.model.loss import IGNORE_INDEX
from fla_ds.model.t5 import VisualT5

FEATURE_DIM = 16
TEXTS = ["am tag scheint die sonne", "morgen früh gibt es nebel"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads cost more than they save. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def config(t5_dir: Path, *overrides: str):
    return load_config(None, ["stage2.backend=t5", f"stage2.model={t5_dir}", *overrides])


def visual_t5(t5_dir: Path, *overrides: str) -> VisualT5:
    torch.manual_seed(0)
    return get_backend("t5").build(config(t5_dir, *overrides), str(t5_dir), FEATURE_DIM, torch.float32)


def clips(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature clips of 7 and 4 steps (the second padded), as the frozen encoder gives them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    return torch.randn(2, 7, FEATURE_DIM, generator=g) * mask.unsqueeze(-1), mask


def train(model: torch.nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
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


def test_t5_trains_fully_loss_falls_and_generation_recovers_the_texts(t5_dir):
    model = visual_t5(t5_dir)
    assert isinstance(model, VisualT5) and model.projector.out_dim == 32  # the T5's d_model
    assert all(p.requires_grad for p in model.parameters())  # full fine-tuning
    losses = train(model, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    assert model.generate(*clips(), max_new_tokens=12, num_beams=3) == TEXTS


def test_t5_counts_target_tokens_and_eos_and_smooths_labels(t5_dir):
    model = visual_t5(t5_dir, "stage2.label_smoothing=0.1", "stage2.max_target_tokens=3").eval()
    features, mask = clips()
    tokenizer = model.tokenizer
    assert model.label_smoothing == 0.1 and model.max_source_len is None  # relative positions: any clip length
    with torch.no_grad():
        loss_sum, n_tokens = model(features, mask, TEXTS)
        assert int(n_tokens) == sum(min(3, len(tokenizer(t, add_special_tokens=False)["input_ids"])) + 1 for t in TEXTS)
        decoder_ids, decoder_mask, labels = model.teacher_forcing(model.target_rows(TEXTS), features.device)
        assert decoder_ids[:, 0].tolist() == [tokenizer.pad_token_id] * 2  # T5 starts the decoder from its pad token
        for ids, row in zip(decoder_ids, labels):
            n = int((row != IGNORE_INDEX).sum())
            assert ids[1:n].tolist() == row[: n - 1].tolist() and row[n - 1] == tokenizer.eos_token_id
        embeds, enc_mask = model.encoder_inputs(features, mask)
        logits = model.t5(inputs_embeds=embeds, attention_mask=enc_mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask).logits
        logp = logits.log_softmax(-1)
        counted = labels != IGNORE_INDEX
        nll = -logp[counted].gather(1, labels[counted].unsqueeze(1)).sum()
        expected = 0.9 * nll + 0.1 * (-logp[counted].mean(-1)).sum()
    assert torch.allclose(loss_sum, expected, rtol=1e-5)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fla_ds.artifacts import verify_folder
    from fla_ds.backends import get_backend
    from fla_ds.config import load_config
    from fla_ds.model.projector import Projector
    step, out = sys.argv[1:3]
    torch.set_num_threads(1)
    verify_folder(step)
    cfg = load_config(step + "/config.yaml")
    model = get_backend(cfg.stage2.backend).load(step, cfg, Projector.load(step + "/projector"), torch.float32, {}).eval()
    inputs = torch.load(out + ".inputs.pt")
    with torch.no_grad():
        loss_sum, n_tokens = model(inputs["features"], inputs["mask"], inputs["texts"])
    texts = model.generate(inputs["features"], inputs["mask"], max_new_tokens=12, num_beams=3)
    torch.save({"loss": loss_sum, "n": n_tokens, "texts": texts}, out)
    """
)


def test_t5_saved_into_a_step_folder_reloads_in_a_fresh_process_with_the_same_outputs(t5_dir, tmp_path):
    from fla_ds.artifacts import write_manifest

    backend = get_backend("t5")
    cfg = config(t5_dir)
    model = visual_t5(t5_dir)
    train(model, steps=10)
    model.eval()
    features, mask = clips()
    with torch.no_grad():
        loss_sum, n_tokens = model(features, mask, TEXTS)
    texts = model.generate(features, mask, max_new_tokens=12, num_beams=3)
    # What Stage2.export writes (without the encoder), sealed as a step folder is.
    step = tmp_path / "step-10"
    state = backend.trainable_state(model)
    model.projector.save(step / "projector", state_dict={k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
    backend.save(model, state, step)
    save_resolved(cfg, step)
    write_manifest(step)
    assert (step / "t5" / "model.safetensors").is_file() and (step / "t5" / "tokenizer.json").is_file()
    assert json.loads((step / "t5" / "config.json").read_text())["model_type"] == "t5"
    out = tmp_path / "reloaded.pt"
    torch.save({"features": features, "mask": mask, "texts": TEXTS}, str(out) + ".inputs.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(step), str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(out)
    assert int(reloaded["n"]) == int(n_tokens)
    assert torch.allclose(reloaded["loss"], loss_sum, atol=1e-5, rtol=0), (reloaded["loss"], loss_sum)
    assert reloaded["texts"] == texts


def test_a_model_of_another_kind_is_refused_before_launch_and_as_an_artifact(t5_dir, tmp_path):
    import shutil

    from fla_ds.artifacts import ArtifactError
    from fla_ds.model.t5 import load_t5
    from fla_ds.preflight import LaunchError, check_model_type

    check_model_type(t5_dir / "config.json", get_backend("t5"))
    with pytest.raises(LaunchError, match="holds a 't5' model; stage2.backend=mbart loads mbart models"):
        check_model_type(t5_dir / "config.json", get_backend("mbart"))
    other = Path(shutil.copytree(t5_dir, tmp_path / "t5"))
    config_file = other / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "bart"}))
    with pytest.raises(ArtifactError, match="model_type 'bart' is not one of t5, mt5, umt5"):
        load_t5(other, artifact=True)
