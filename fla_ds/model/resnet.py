"""ResNet-18 without torchvision, and loading torchvision's ImageNet weights into it.

torchvision does not import beside the CPU build of torch this project tests with,
so the network is written out here. Every parameter and buffer name,
shape and the initialisation match ``torchvision.models.resnet18``: a state dict saved from
torchvision loads as it is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

FEATURE_DIM = 512


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]). ``num_classes=None`` builds it without the
    ImageNet classifier ``fc``: an encoder that uses only the pooled 512-d features must not
    carry parameters that never get a gradient (DDP and ZeRO complain about those)."""

    def __init__(self, num_classes: int | None = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation (fc keeps nn.Linear's default, as there)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]]:
        """The five stages in order, each with the modules it runs (whose BatchNorm
        statistics a recomputation must leave alone)."""
        stem_modules: list[nn.Module] = [self.conv1, self.bn1]
        return [(self.stem, stem_modules)] + [(layer, [layer]) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward_features(self, x: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """(N, 3, H, W) -> pooled (N, 512). With ``gradient_checkpointing`` each stage keeps
        only its input for the backward pass and is recomputed there."""
        for run, modules in self.stages():
            if gradient_checkpointing and torch.is_grad_enabled():
                contexts = lambda modules=modules: (contextlib.nullcontext(), frozen_batchnorm_stats(modules))  # noqa: E731
                x = checkpoint(run, x, use_reentrant=False, context_fn=contexts)
            else:
                x = run(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return features if self.fc is None else self.fc(features)


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: list[nn.Module]) -> Iterator[None]:
    """Undo whatever a recomputation does to BatchNorm running statistics: a checkpointed
    stage runs its forward twice in training, and the second pass must not move the running
    mean/var (or the batch counter) a second time."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(b, b.detach().clone()) for m in norms for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


# ------------------------------------------------------------------ torchvision weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``.pth``/``.pt`` file (loaded with
    ``weights_only=True``: a checkpoint is untrusted input and must not run code). Accepts a
    raw state dict or one nested under ``state_dict``/``model``; drops a DDP ``module.``
    prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for nest in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(nest), Mapping):
            state = state[nest]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_torchvision_checkpoint(model: ResNet18, path: str | Path) -> list[str]:
    """Load torchvision ResNet-18 weights into ``model``, strictly: every parameter and
    buffer must be there with its exact shape, or ValueError names the first offending key.
    Two tolerated exceptions, both harmless: ``fc.*`` when the model has no classifier
    (returned as the list of ignored keys), and a missing ``num_batches_tracked`` (the
    official ImageNet files predate that buffer; torchvision itself fills it in)."""
    state = read_state_dict(path)
    expected = model.state_dict()
    ignored = sorted(k for k in state if k.startswith("fc.") and model.fc is None)
    for key in ignored:
        del state[key]
    for key, value in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                state[key] = value
                continue
            raise ValueError(f"{path}: missing key {key!r} (shape {tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: shape mismatch for {key!r}: file {tuple(state[key].shape)}, model {tuple(value.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); not a torchvision ResNet-18?")
    model.load_state_dict(state, strict=True)
    return ignored
