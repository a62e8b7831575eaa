"""Stage-1 models: torchvision compatibility of the ResNet-18, masking in the visual encoder,
Light-T's loss and decoding. Small images and a tiny Light-T keep it fast on CPU."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from fla_ds.model import LightT, MaskedBatchNorm1d, ResNet18, SignTranslator, VisualEncoder, load_torchvision_checkpoint

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads cost more than they save, and several times
    more when the 2 cores are shared with other processes. Restored for other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.{key}", (c,)) for key in ("weight", "bias", "running_mean", "running_var")] + [(f"{name}.num_batches_tracked", ())]


# torchvision.models.resnet18().state_dict(), in order: names and shapes, written out by hand.
TORCHVISION_RESNET18 = [
    ("conv1.weight", (64, 3, 7, 7)), *bn("bn1", 64),
    ("layer1.0.conv1.weight", (64, 64, 3, 3)), *bn("layer1.0.bn1", 64),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)), *bn("layer1.0.bn2", 64),
    ("layer1.1.conv1.weight", (64, 64, 3, 3)), *bn("layer1.1.bn1", 64),
    ("layer1.1.conv2.weight", (64, 64, 3, 3)), *bn("layer1.1.bn2", 64),
    ("layer2.0.conv1.weight", (128, 64, 3, 3)), *bn("layer2.0.bn1", 128),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)), *bn("layer2.0.bn2", 128),
    ("layer2.0.downsample.0.weight", (128, 64, 1, 1)), *bn("layer2.0.downsample.1", 128),
    ("layer2.1.conv1.weight", (128, 128, 3, 3)), *bn("layer2.1.bn1", 128),
    ("layer2.1.conv2.weight", (128, 128, 3, 3)), *bn("layer2.1.bn2", 128),
    ("layer3.0.conv1.weight", (256, 128, 3, 3)), *bn("layer3.0.bn1", 256),
    ("layer3.0.conv2.weight", (256, 256, 3, 3)), *bn("layer3.0.bn2", 256),
    ("layer3.0.downsample.0.weight", (256, 128, 1, 1)), *bn("layer3.0.downsample.1", 256),
    ("layer3.1.conv1.weight", (256, 256, 3, 3)), *bn("layer3.1.bn1", 256),
    ("layer3.1.conv2.weight", (256, 256, 3, 3)), *bn("layer3.1.bn2", 256),
    ("layer4.0.conv1.weight", (512, 256, 3, 3)), *bn("layer4.0.bn1", 512),
    ("layer4.0.conv2.weight", (512, 512, 3, 3)), *bn("layer4.0.bn2", 512),
    ("layer4.0.downsample.0.weight", (512, 256, 1, 1)), *bn("layer4.0.downsample.1", 512),
    ("layer4.1.conv1.weight", (512, 512, 3, 3)), *bn("layer4.1.bn1", 512),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)), *bn("layer4.1.bn2", 512),
    ("fc.weight", (1000, 512)), ("fc.bias", (1000,)),
]


def torchvision_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.tensor(7) if name.endswith("num_batches_tracked") else torch.randn(shape, generator=g).abs() + 0.1
        for name, shape in TORCHVISION_RESNET18
    }


def real_frames(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return features[mask]


# ------------------------------------------------------------------ ResNet-18


def test_resnet18_names_and_shapes_are_torchvisions():
    assert len(TORCHVISION_RESNET18) == 122
    ours = [(k, tuple(v.shape)) for k, v in ResNet18().state_dict().items()]
    assert ours == TORCHVISION_RESNET18
    assert [k for k, _ in ours if not k.startswith("fc.")] == list(ResNet18(num_classes=None).state_dict())


def test_resnet18_initialisation_is_torchvisions():
    model = ResNet18()
    w = model.layer3[0].conv2.weight
    assert w.std().item() == pytest.approx((2.0 / (256 * 9)) ** 0.5, rel=0.05)  # kaiming, fan_out
    assert torch.all(model.layer2[0].downsample[1].weight == 1) and torch.all(model.bn1.bias == 0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-nested"])
def test_a_torchvision_state_dict_loads_strictly(tmp_path, fmt):
    state = torchvision_like_state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if fmt == "pth-nested" else state, path)
    with_head = ResNet18()
    assert load_torchvision_checkpoint(with_head, path) == []
    for name, value in with_head.state_dict().items():
        assert torch.equal(value, state[name]), name
    headless = ResNet18(num_classes=None)
    assert load_torchvision_checkpoint(headless, path) == ["fc.bias", "fc.weight"]
    assert torch.equal(headless.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_the_official_files_without_num_batches_tracked_load(tmp_path):
    state = {k: v for k, v in torchvision_like_state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = ResNet18()
    load_torchvision_checkpoint(model, tmp_path / "old.pth")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("layer3.1.bn2.running_var"), "missing key 'layer3.1.bn2.running_var'"),
        (lambda s: s.update({"layer2.0.downsample.0.weight": torch.zeros(128, 64, 3, 3)}), "shape mismatch for 'layer2.0.downsample.0.weight'"),
        (lambda s: s.update({"layer5.0.conv1.weight": torch.zeros(1)}), "unexpected key 'layer5.0.conv1.weight'"),
    ],
)
def test_an_incompatible_checkpoint_is_refused_naming_the_key(tmp_path, damage, message):
    state = torchvision_like_state_dict()
    damage(state)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_torchvision_checkpoint(ResNet18(), tmp_path / "bad.safetensors")


# ------------------------------------------------------------------ visual encoder


def test_masked_batchnorm_counts_real_positions_only():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6) * 3 + 1
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    x[~mask.unsqueeze(1).expand_as(x)] = 100.0  # garbage in the padding must not matter
    ours, plain = MaskedBatchNorm1d(4), nn.BatchNorm1d(4)
    real = torch.cat([x[0, :, :6], x[1, :, :3]], dim=1).unsqueeze(0)  # (1, C, 9): the same clips, unpadded
    out, ref = ours(x, mask), plain(real)
    assert torch.allclose(torch.cat([out[0], out[1, :, :3]], dim=1), ref[0], atol=1e-5)
    assert torch.all(out[1, :, 3:] == 0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).float(), getattr(plain, name).float(), atol=1e-6), name
    ours.eval(), plain.eval()
    out = ours(x, mask)
    unpadded = ours(real, torch.ones(1, 9, dtype=torch.bool))
    assert torch.equal(torch.cat([out[0], out[1, :, :3]], dim=1), unpadded[0])  # exactly, in eval
    assert torch.allclose(unpadded, plain(real), atol=1e-5)


def clips(*lengths: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for n in lengths]


def pad_batch(videos: list[torch.Tensor], length: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(videos), length, *videos[0].shape[1:]), fill)
    mask = torch.zeros(len(videos), length, dtype=torch.bool)
    for i, v in enumerate(videos):
        out[i, : len(v)] = v
        mask[i, : len(v)] = True
    return out, mask


@pytest.fixture(scope="module")
def encoder() -> VisualEncoder:
    torch.manual_seed(0)
    return VisualEncoder(out_dim=64, kernel_size=5)


def test_encoder_shapes_and_zero_padding(encoder):
    video, mask = pad_batch(clips(5, 3), 6, fill=5.0)
    encoder.train()
    features, out_mask = encoder(video, mask)
    assert features.shape == (2, 6, 64) and torch.equal(out_mask, mask)
    assert torch.all(features[~mask] == 0) and features[mask].abs().sum() > 0


def test_padding_does_not_change_a_clip_in_eval(encoder):
    encoder.eval()
    short, long = clips(3, 7)
    with torch.no_grad():
        alone, _ = encoder(*pad_batch([short], 3))
        batched, mask = encoder(*pad_batch([long, short], 9, fill=-4.0))
    assert torch.allclose(batched[1, :3], alone[0], atol=1e-5)


def test_padding_does_not_change_training_features_or_statistics():
    a, b = clips(5, 3, seed=1)

    def run(length: int, fill: float):
        torch.manual_seed(0)
        enc = VisualEncoder(out_dim=32).train()
        features, mask = enc(*pad_batch([a, b], length, fill))
        return real_frames(features, mask), {k: v for k, v in enc.state_dict().items() if "running" in k}

    tight, stats_tight = run(5, 0.0)
    loose, stats_loose = run(9, 3.0)
    assert torch.allclose(tight, loose, atol=1e-5)
    for name, value in stats_tight.items():
        assert torch.allclose(value, stats_loose[name], atol=1e-6), name


def test_gradient_checkpointing_changes_neither_gradients_nor_statistics():
    video, mask = pad_batch(clips(4, 2, seed=2), 4)

    def run(checkpointing: bool):
        torch.manual_seed(0)
        enc = VisualEncoder(out_dim=16).train()
        enc.gradient_checkpointing = checkpointing
        enc(video, mask)[0].square().sum().backward()
        return enc.cnn.layer2[0].conv1.weight.grad.clone(), enc.state_dict()

    grad_plain, state_plain = run(False)
    grad_ckpt, state_ckpt = run(True)
    assert torch.allclose(grad_plain, grad_ckpt, atol=1e-5)
    for name, value in state_plain.items():
        assert torch.equal(value, state_ckpt[name]), name  # recomputation must not move BN stats twice


def test_encoder_logs_where_its_weights_come_from(tmp_path, caplog):
    save_file(torchvision_like_state_dict(), str(tmp_path / "resnet18.safetensors"))
    from fla_ds.config import load_config

    scratch = load_config(None, ["visual.out_dim=8"])
    with caplog.at_level(logging.INFO, logger="fla_ds"):
        VisualEncoder.from_config(scratch, pretrained=False)  # weights about to come from a checkpoint: nothing said
        assert "randomly initialised" not in caplog.text
        VisualEncoder.from_config(scratch, pretrained=True)
        enc = VisualEncoder(out_dim=8, pretrained=str(tmp_path / "resnet18.safetensors"))
    assert "randomly initialised" in caplog.text and "ImageNet ResNet-18 weights loaded" in caplog.text
    assert torch.equal(enc.cnn.bn1.running_mean, torchvision_like_state_dict()["bn1.running_mean"])


# ------------------------------------------------------------------ Light-T


def tiny_light_t(vocab: int = 12, in_dim: int = 8, **kw) -> LightT:
    args = dict(d_model=32, heads=4, encoder_layers=1, decoder_layers=1, ffn=64, dropout=0.0, adapter_hidden=32, max_len=10)
    return LightT(in_dim, vocab, PAD, BOS, EOS, **{**args, **kw})


def test_loss_is_the_label_smoothed_sum_over_real_tokens():
    torch.manual_seed(0)
    model = tiny_light_t(vocab=5)
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[3, EOS, PAD]])
    loss, n = model.token_loss(logits, targets)
    logp = logits.log_softmax(-1)[0]
    # (1 - eps) * NLL + eps * mean_v(-log p_v), for the 2 real positions only
    manual = sum(0.8 * -logp[i, t] + 0.2 * -logp[i].mean() for i, t in [(0, 3), (1, EOS)])
    assert n.item() == 2 and torch.allclose(loss, manual)
    assert not torch.allclose(loss, F.cross_entropy(logits[0, :2], targets[0, :2], reduction="sum"))  # smoothing is on


def test_the_stage2_token_loss_is_the_smoothed_sum_over_labelled_positions():
    """fla_ds.model.loss.target_token_loss (every stage-2 backend's): torch's label smoothing,
    (1 - eps) NLL + eps x mean over the vocabulary of -log p, summed over the positions whose
    label is not IGNORE_INDEX only, and their count."""
    from fla_ds.model.loss import IGNORE_INDEX, target_token_loss

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[3, 1, IGNORE_INDEX, 4, 0], [IGNORE_INDEX, IGNORE_INDEX, 7, 2, 10]])
    counted = labels != IGNORE_INDEX
    logp = logits[counted].log_softmax(-1)
    nll = -logp.gather(1, labels[counted][:, None]).squeeze(1)
    for eps in (0.0, 0.1):
        loss, n_tokens = target_token_loss(logits, labels, eps)
        assert int(n_tokens) == 7
        assert loss.item() == pytest.approx(((1 - eps) * nll + eps * -logp.mean(-1)).sum().item(), rel=1e-6)


def test_pad_targets_contribute_nothing():
    model = tiny_light_t(vocab=5)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    targets = torch.tensor([[3, 4, EOS, PAD], [4, EOS, PAD, PAD]])
    loss, n = model.token_loss(logits, targets)
    changed = logits.detach().clone()
    changed[targets == PAD] = torch.randn(3, 5) * 50
    assert torch.equal(model.token_loss(changed, targets)[0], loss.detach()) and n.item() == 5
    loss.backward()
    assert torch.all(logits.grad[targets == PAD] == 0)


def test_forward_teacher_forces_and_counts_tokens():
    torch.manual_seed(0)
    model = tiny_light_t()
    features, mask = torch.randn(2, 6, 8), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    loss, n = model(features, mask, torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, PAD]]))
    assert torch.isfinite(loss) and n.item() == 5
    loss.backward()
    assert model.adapter[0].weight.grad.abs().sum() > 0


def test_light_t_ignores_padding_in_eval():
    torch.manual_seed(0)
    model = tiny_light_t().eval()
    short, long = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    batched = torch.cat([long, F.pad(short, (0, 0, 0, 3), value=9.0)])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    ids = torch.tensor([[BOS, 4, 5], [BOS, 6, PAD]])
    alone = model.logits(short, torch.ones(1, 3, dtype=torch.bool), ids[1:, :2])
    assert torch.allclose(model.logits(batched, mask, ids)[1, :2], alone[0], atol=1e-5)
    assert model.generate(batched, mask, beam_size=3)[1] == model.generate(short, torch.ones(1, 3, dtype=torch.bool), beam_size=3)[0]


def test_a_tiny_light_t_overfits_two_sentences_and_decodes_them():
    model, features, mask = trained_light_t(steps=150)
    expected = [[5, 6, 7, 8], [9, 4]]
    assert model.greedy(features, mask) == expected
    assert model.generate(features, mask, beam_size=1) == expected
    assert model.generate(features, mask, beam_size=5) == expected


@pytest.mark.parametrize("seed", range(4))
def test_beam_one_is_greedy_and_outputs_hold_no_special_tokens(seed):
    torch.manual_seed(seed)
    model = tiny_light_t(vocab=6).eval()  # few tokens: EOS/BOS/PAD would be likely picks
    features = torch.randn(3, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]])
    greedy = model.greedy(features, mask, max_len=7)
    assert model.generate(features, mask, beam_size=1, max_len=7) == greedy
    # The beam machinery itself with one beam: a pure log-prob sum cannot improve after the
    # best continuation is EOS, so it must stop exactly where greedy does.
    assert model.beam_search(features, mask, beam_size=1, max_len=7, length_penalty=0.0) == greedy
    for beam in (1, 2, 5):
        for length_penalty in (0.0, 1.0):
            out = model.generate(features, mask, beam_size=beam, max_len=7, length_penalty=length_penalty)
            assert len(out) == 3
            assert all(len(h) < 7 and not {BOS, EOS, PAD} & set(h) for h in out)
            assert out == model.generate(features, mask, beam_size=beam, max_len=7, length_penalty=length_penalty)  # deterministic


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_beam_wide_enough_finds_the_best_hypothesis(length_penalty):
    """Two content tokens and max_len 4 make 15 possible outputs; 16 beams keep them all, so
    beam search must return the one brute force scores best."""
    torch.manual_seed(1)
    model = tiny_light_t(vocab=5).eval()
    features, mask = torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool)

    def score(hyp: list[int]) -> float:
        ids = torch.tensor([[BOS, *hyp, EOS]])
        logp = model.logits(features, mask, ids[:, :-1]).log_softmax(-1)[0]
        return logp.gather(1, ids[0, 1:, None]).sum().item() / (len(hyp) + 1) ** length_penalty

    outputs = [list(h) for n in range(4) for h in itertools.product([3, 4], repeat=n)]
    best = max(outputs, key=score)
    with torch.no_grad():
        assert model.beam_search(features, mask, beam_size=16, max_len=4, length_penalty=length_penalty) == [best]


def test_sign_translator_runs_video_to_loss_and_text():
    torch.manual_seed(0)
    model = SignTranslator(VisualEncoder(out_dim=16), tiny_light_t(in_dim=16))
    video, mask = pad_batch(clips(4, 2, seed=3), 4)
    loss, n = model(video, mask, torch.tensor([[BOS, 5, EOS], [BOS, EOS, PAD]]))
    loss.backward()
    assert n.item() == 3 and model.encoder.cnn.conv1.weight.grad.abs().sum() > 0
    model.eval()
    out = model.generate(video, mask, beam_size=2, max_len=4)
    assert len(out) == 2 and all(len(h) < 4 for h in out)


# ------------------------------------------------------------------ Light-T's key/value cache

CACHE_ATOL = 1e-4
"""Per-step log-probabilities, cached vs re-decoded prefix, fp32: the same arithmetic summed in
another order (scaled_dot_product_attention over cached keys vs the full causal attention);
measured below 1e-5 here."""


def trained_light_t(steps: int = 60) -> tuple[LightT, torch.Tensor, torch.Tensor]:
    """A tiny Light-T trained ``steps`` Adam steps on two sentences (seeded), in eval mode,
    with its features and mask."""
    torch.manual_seed(0)
    model = tiny_light_t()
    features, mask = torch.randn(2, 6, 8), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    targets = torch.tensor([[BOS, 5, 6, 7, 8, EOS], [BOS, 9, 4, EOS, PAD, PAD]])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, n = model(features, mask, targets)
        optimiser.zero_grad()
        (loss / n).backward()
        optimiser.step()
    return model.eval(), features, mask


@pytest.mark.parametrize("seed", [0, 1, 2, "trained"])
def test_cached_decoding_gives_the_uncached_hypotheses(seed):
    """Beam 1 (greedy) and 5, several lengths, on random models (two decoder layers, padded
    clips) and a partly trained one: identical hypotheses with and without the cache."""
    if seed == "trained":
        model, features, mask = trained_light_t()
    else:
        torch.manual_seed(seed)
        model = tiny_light_t(vocab=9, decoder_layers=2).eval()
        features = torch.randn(3, 5, 8)
        mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]])
    for beam in (1, 5):
        for max_len in (2, 5, 9):
            for length_penalty in (0.0, 1.0):
                cached = model.generate(features, mask, beam_size=beam, max_len=max_len, length_penalty=length_penalty)
                assert cached == model.generate(features, mask, beam_size=beam, max_len=max_len, length_penalty=length_penalty, cache=False)


def test_cached_steps_score_like_the_whole_prefix():
    """The scores themselves: each step's log-probabilities along random token paths of two
    clips x two beams, the rows reordered between steps within each clip, as beam search does."""
    torch.manual_seed(3)
    model = tiny_light_t(vocab=9, decoder_layers=2).eval()
    features, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        memory, mask = model.encode(features, mask).repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
        cached, reference = model.step_decoder(memory, mask, 8), model.step_decoder(memory, mask, 8, cache=False)
        ids = torch.full((4, 1), BOS)
        for step in range(8):
            got, want = cached(ids, step == 7), reference(ids, step == 7)
            assert torch.equal(got.isinf(), want.isinf()) and torch.allclose(got, want, atol=CACHE_ATOL), (got - want).abs().max()
            rows = torch.tensor([1, 0, 2, 2]) if step % 2 else torch.tensor([0, 0, 3, 2])
            cached.reorder(rows)
            ids = torch.cat([ids[rows], torch.randint(3, 9, (4, 1))], dim=1)
