"""Model registry. Every model takes inputs in [0, 1]: normalisation is a buffer inside it.

``build_model(name, num_classes, in_channels, mean, std)`` returns a ``Normalized`` wrapper whose
``.net`` is the bare network; ``first_layer(model)`` names the layer YOPO propagates through.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalized(nn.Module):
    """(x - mean) / std in front of a network, so attacks and the eps-ball live in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.net = net
        channels = len(mean) if mean is not None else 1
        mean_t = torch.tensor(mean if mean is not None else [0.0]).view(1, channels, 1, 1)
        std_t = torch.tensor(std if std is not None else [1.0]).view(1, channels, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class SmallCNN(nn.Module):
    """The MNIST network of TRADES and YOPO (and the paper, A.1): four 3x3 convolutions with two
    max-pools, then three fully connected layers, for 28x28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5):
        super().__init__()
        relu = nn.ReLU()  # not in place: YOPO reads the gradient at conv1's output
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3)), ("relu1", relu),
            ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", relu), ("pool1", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", relu),
            ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", relu), ("pool2", nn.MaxPool2d(2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(64 * 4 * 4, 200)), ("relu1", relu), ("drop", nn.Dropout(dropout)),
            ("fc2", nn.Linear(200, 200)), ("relu2", relu),
            ("fc3", nn.Linear(200, num_classes)),
        ]))
        # The official TRADES/YOPO initialisation: Kaiming convolutions, a zero last layer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.fc3.weight)
        nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class CompactCNN(nn.Module):
    """A compact network for 28x28 inputs: two strided 4x4 convolutions (to 14x14, then 7x7) and
    one dense layer of 128 before the classifier; about 2.1 M multiply-adds a forward against
    SmallCNN's 9.9 M, for studies of robustness per second."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        relu = nn.ReLU()  # not in place: YOPO reads the gradient at conv1's output
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 4, stride=2, padding=1)), ("relu1", relu),
            ("conv2", nn.Conv2d(32, 64, 4, stride=2, padding=1)), ("relu2", relu),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(64 * 7 * 7, 128)), ("relu1", relu), ("fc2", nn.Linear(128, num_classes)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016) for 32x32 inputs, as in Wong et al. and Rice et al."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) as used by Madry et al. and TRADES."""

    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], [1, 2, 2]):
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


# name -> (constructor(num_classes, in_channels), attribute path of the first layer, for YOPO)
MODELS: dict[str, tuple[Callable[[int, int], nn.Module], str]] = {
    "smallcnn": (lambda c, i: SmallCNN(c, i), "features.conv1"),
    "compactcnn": (lambda c, i: CompactCNN(c, i), "features.conv1"),
    "preactresnet18": (lambda c, i: PreActResNet18(c, i), "conv1"),
    "wrn34-10": (lambda c, i: WideResNet(34, 10, c, i), "conv1"),
    "resnet50": (_resnet50, "conv1"),
}


def build_model(name: str, num_classes: int, in_channels: int, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> Normalized:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    model = Normalized(MODELS[name][0](num_classes, in_channels), mean, std)
    model.first_layer_path = "net." + MODELS[name][1]  # a plain attribute: no duplicate parameters
    return model


def first_layer(model: nn.Module) -> nn.Module:
    """The first layer of a registry model (YOPO's layer one), found from the registry. It is
    applied directly to the normalised input in every registry model."""
    path = getattr(model, "first_layer_path", None)
    if path is None:
        raise ValueError("YOPO needs a model from the registry (atcd_ray.core.models.build_model)")
    return model.get_submodule(path)


def first_layer_output(model: Normalized, x: torch.Tensor) -> torch.Tensor:
    """The first layer's output for inputs x in [0, 1]: YOPO's cheap partial forward."""
    return first_layer(model)((x - model.mean) / model.std)
