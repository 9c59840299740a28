"""Architectures by name, without torchvision, and loading a checkpoint into one.

`resnet18/34/50` repeat torchvision's module tree (names, shapes, buffers, init),
so torchvision checkpoints load with `strict=True`; `tiny-resnet` is the demo's
model; `"package.module:function"` builds any user architecture.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferFastError, first_few
from ..io.checkpoints import StateSource, load_state
from ..measure.presets import classifier_name


class BasicBlock(nn.Module):
    """Two 3x3 convs; (N, inplanes, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision's "ResNet v1.5") -> 1x1 with 4x the width."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's init, so that a random θr drawn here has the same
        # distribution as one drawn by torchvision (BatchNorm's default is already 1/0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyResNet(nn.Module):
    """ResNet-shaped CNN for small images (the demo's 8x8 digits), torchvision's names:
    a 3x3 stem without pooling, three stages of two basic blocks, global pooling, fc."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, 1)
        self.layer2 = self._stage(width, 2 * width, 2)
        self.layer3 = self._stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, downsample), BasicBlock(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda n, c: ResNet(BasicBlock, [2, 2, 2, 2], n, c),
    "resnet34": lambda n, c: ResNet(BasicBlock, [3, 4, 6, 3], n, c),
    "resnet50": lambda n, c: ResNet(Bottleneck, [3, 4, 6, 3], n, c),
    "tiny-resnet": lambda n, c: TinyResNet(n, in_channels=c),
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def _build_user(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """`package.module:function` -> function(num_classes=..., [in_channels=...])."""
    module_name, _, func_name = arch.partition(":")
    if not module_name or not func_name:
        raise TransferFastError(f"architecture {arch!r}: expected the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransferFastError(f"architecture {arch!r}: cannot import {module_name!r} "
                                f"({type(exc).__name__}: {exc})") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TransferFastError(f"architecture {arch!r}: {module_name!r} has no function "
                                f"{func_name!r}")
    try:
        accepts = "in_channels" in inspect.signature(func).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        accepts = False
    # Only functions that declare in_channels get it, so a plain f(num_classes) works too.
    try:
        model = func(num_classes=num_classes,
                     **({"in_channels": in_channels} if accepts else {}))
    except TypeError as exc:  # a builder without a num_classes parameter, most often
        raise TransferFastError(f"architecture {arch!r}: calling {func_name}(num_classes="
                                f"{num_classes}) failed ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise TransferFastError(f"architecture {arch!r}: returned a {type(model).__name__}, "
                                "expected a torch.nn.Module")
    return model


def build_model(arch: str, num_classes: int, *, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model taking (N, in_channels, H, W) to (N, num_classes).

    `arch` is one of ARCHITECTURES or "package.module:function"; the function is
    called as function(num_classes=num_classes), plus in_channels=in_channels when
    its signature has that parameter.
    """
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TransferFastError(f"{what} must be a positive integer, got {value!r}")
    builder = _BUILDERS.get(arch.strip().lower())
    if builder is not None:
        return builder(num_classes, in_channels)
    if ":" in arch:
        return _build_user(arch.strip(), num_classes, in_channels)
    raise TransferFastError(f"unknown architecture {arch!r}: expected one of "
                            f"{', '.join(ARCHITECTURES)}, or package.module:function")


def _shallowest(names: list[str], last: bool) -> str | None:
    """The least-nested of `names`; ties go to the first (or last) in checkpoint order.

    Checkpoint order is not network order (safetensors stores names sorted), and
    nested layers share suffixes (an SE block's 'fc'); the stem and the head are
    nearly always the least nested.
    """
    ordered = list(reversed(names)) if last else names
    return min(ordered, key=lambda n: n.count("."), default=None)


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Outputs of the classifier that `presets.classifier_name` finds, or None."""
    head = classifier_name(list(state), {n: tuple(t.shape) for n, t in state.items()})
    return None if head is None else state[f"{head}.weight"].shape[0]


def infer_in_channels(state: dict[str, torch.Tensor]) -> int | None:
    """Input channels of the stem: the least nested 4-D (conv) weight, or None."""
    convs = [n for n, t in state.items() if t.dim() == 4 and n.endswith("weight")]
    name = _shallowest(convs, last=False)
    return None if name is None else state[name].shape[1]


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], origin: str,
               arch: str) -> None:
    """One line naming the first few missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    # Older torchvision checkpoints predate BatchNorm's counter; torch fills it in.
    missing = [n for n in expected if n not in state and not n.endswith("num_batches_tracked")]
    unexpected = [n for n in state if n not in expected]
    mismatched = [f"{n} {tuple(state[n].shape)} vs {tuple(t.shape)}"
                  for n, t in expected.items() if n in state and state[n].shape != t.shape]
    problems = [f"{len(items)} {label}: {first_few(items, 3)}" for label, items in
                (("missing", missing), ("unexpected", unexpected),
                 ("with other shapes (checkpoint vs model)", mismatched)) if items]
    if problems:
        raise TransferFastError(f"{origin}: does not fit architecture {arch!r}: "
                                + "; ".join(problems))


def load_model(arch: str, checkpoint: StateSource, *, num_classes: int | None = None,
               in_channels: int | None = None) -> nn.Module:
    """`arch` with the checkpoint's parameters, on the CPU, in eval mode.

    num_classes / in_channels default to what the checkpoint holds (classifier
    rows, stem input channels). Any missing, unexpected or mis-shaped tensor is a
    TransferFastError naming the checkpoint.
    """
    origin = str(checkpoint) if isinstance(checkpoint, (str, Path)) else type(checkpoint).__name__
    state = load_state(checkpoint)
    if num_classes is None:
        num_classes = infer_num_classes(state)
        if num_classes is None:
            raise TransferFastError(
                f"{origin}: cannot tell the number of classes (no classifier among its "
                "tensors); give num_classes")
    if in_channels is None:
        in_channels = infer_in_channels(state) or 3
    model = build_model(arch, num_classes, in_channels=in_channels)
    _check_fit(model, state, origin, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # anything the check above did not foresee
        raise TransferFastError(f"{origin}: does not fit architecture {arch!r}: "
                                f"{str(exc).splitlines()[-1].strip()}") from exc
    return model.eval()
