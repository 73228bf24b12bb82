"""Receptive fields against values worked out by hand (and by gradients), for VGG16 and ResNet-18."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from delve import SaturationTracker
from delve.receptive_field import (
    load_receptive_fields,
    receptive_fields,
    save_receptive_fields,
    trace_receptive_fields,
    unproductive_layers,
)

# --------------------------------------------------------------------------- models
VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """torchvision's VGG16 layout (features / avgpool / classifier); ``width`` divides the channels."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        layers, channels = [], 3
        for entry in VGG16_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, entry // width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = entry // width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = 4096 // width
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout; ``width`` divides the channels."""

    def __init__(self, width: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        planes = [64 // width, 128 // width, 256 // width, 512 // width]
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = planes[0]
        for index, (plane, stride) in enumerate(zip(planes, [1, 2, 2, 2]), start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(inplanes, plane, stride), BasicBlock(plane, plane)))
            inplanes = plane
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Worked out by hand with r_l = r_{l-1} + (k_l - 1) j_{l-1}, j_l = j_{l-1} s_l:
# stage 1 (j=1): 3, 5; pool -> 6, j=2; stage 2: 10, 14; pool -> 16, j=4; stage 3: 24, 32, 40;
# pool -> 44, j=8; stage 4: 60, 76, 92; pool -> 100, j=16; stage 5: 132, 164, 196 (VGG16's
# published 196 for conv5_3). The classifier sees the whole image.
VGG16_FIELDS = {
    "features-0": 3, "features-2": 5, "features-5": 10, "features-7": 14,
    "features-10": 24, "features-12": 32, "features-14": 40,
    "features-17": 60, "features-19": 76, "features-21": 92,
    "features-24": 132, "features-26": 164, "features-28": 196,
    "classifier-0": math.inf, "classifier-3": math.inf, "classifier-6": math.inf,
}
# Input field of each conv = field of the conv before it, plus the pool step when one sits between.
VGG16_INPUT_FIELDS = {
    "features-0": 1, "features-2": 3, "features-5": 6, "features-7": 10, "features-10": 16, "features-12": 24,
    "features-14": 32, "features-17": 44, "features-19": 60, "features-21": 76, "features-24": 100,
    "features-26": 132, "features-28": 164,
}

# conv1 7x7/2 -> 7, j=2; maxpool 3/2 -> 11, j=4; layer1: 19, 27 | 35, 43; layer2 block 0: conv1 3x3/2 ->
# 51 (j=8), conv2 -> 67, downsample 1x1/2 -> 43, sum -> 67; block 1: 83, 99; layer3: 115 (j=16), 147,
# downsample 99 | 179, 211; layer4: 243 (j=32), 307, downsample 211 | 371, 435 (ResNet-18's published 435).
RESNET18_FIELDS = {
    "conv1": 7,
    "layer1-0-conv1": 19, "layer1-0-conv2": 27, "layer1-1-conv1": 35, "layer1-1-conv2": 43,
    "layer2-0-conv1": 51, "layer2-0-conv2": 67, "layer2-0-downsample-0": 43,
    "layer2-1-conv1": 83, "layer2-1-conv2": 99,
    "layer3-0-conv1": 115, "layer3-0-conv2": 147, "layer3-0-downsample-0": 99,
    "layer3-1-conv1": 179, "layer3-1-conv2": 211,
    "layer4-0-conv1": 243, "layer4-0-conv2": 307, "layer4-0-downsample-0": 211,
    "layer4-1-conv1": 371, "layer4-1-conv2": 435,
    "fc": math.inf,
}
RESNET18_INPUT_FIELDS = {
    "conv1": 1, "layer1-0-conv1": 11, "layer1-0-conv2": 19, "layer1-1-conv1": 27, "layer1-1-conv2": 35,
    "layer2-0-conv1": 43, "layer2-0-conv2": 51, "layer2-0-downsample-0": 43,
    "layer2-1-conv1": 67, "layer2-1-conv2": 83,
    "layer3-0-conv1": 99, "layer3-0-conv2": 115, "layer3-0-downsample-0": 99,
    "layer3-1-conv1": 147, "layer3-1-conv2": 179,
    "layer4-0-conv1": 211, "layer4-0-conv2": 243, "layer4-0-downsample-0": 211,
    "layer4-1-conv1": 307, "layer4-1-conv2": 371,
}


def hand_unproductive(fields: dict, input_fields: dict, size: int) -> list:
    """The paper's rule applied to the hand-computed tables."""
    return [
        name for name, field in fields.items()
        if name in input_fields and input_fields[name] >= size and field > size
    ]


@pytest.fixture(scope="module")
def vgg() -> VGG16:
    torch.manual_seed(0)
    return VGG16(width=16)


@pytest.fixture(scope="module")
def resnet() -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(width=8)


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_vgg16_fields_match_hand_computation(vgg: VGG16, size: int) -> None:
    assert dict(receptive_fields(vgg, (3, size, size))) == VGG16_FIELDS
    traced = trace_receptive_fields(vgg, (3, size, size))
    assert {n: layer.input_receptive_field[0] for n, layer in traced.items() if n.startswith("features")} == (
        VGG16_INPUT_FIELDS
    )


@pytest.mark.parametrize(
    "size, expected",
    [
        (32, ["features-14", "features-17", "features-19", "features-21", "features-24", "features-26", "features-28"]),
        (64, ["features-21", "features-24", "features-26", "features-28"]),
        (128, ["features-26", "features-28"]),
        (224, []),
    ],
)
def test_vgg16_unproductive_layers(vgg: VGG16, size: int, expected: list) -> None:
    assert hand_unproductive(VGG16_FIELDS, VGG16_INPUT_FIELDS, size) == expected
    assert unproductive_layers(vgg, (3, size, size)) == expected
    assert unproductive_layers(vgg, size) == expected  # int: square image, channels of the first conv


@pytest.mark.parametrize("size", [32, 64, 224])
def test_resnet18_fields_and_unproductive_layers(resnet: ResNet18, size: int) -> None:
    traced = trace_receptive_fields(resnet, (3, size, size))
    assert {n: layer.receptive_field for n, layer in traced.items()} == {
        n: (float(v), float(v)) for n, v in RESNET18_FIELDS.items()
    }
    assert {n: layer.input_receptive_field[0] for n, layer in traced.items() if n != "fc"} == RESNET18_INPUT_FIELDS
    expected = hand_unproductive(RESNET18_FIELDS, RESNET18_INPUT_FIELDS, size)
    assert unproductive_layers(resnet, (3, size, size)) == expected
    if size == 32:
        assert expected[0] == "layer1-1-conv2" and "layer2-0-downsample-0" in expected
    if size == 224:
        assert expected == ["layer4-0-conv2", "layer4-1-conv1", "layer4-1-conv2"]


def test_full_width_resnet18_names_match_the_tracker() -> None:
    model = ResNet18(width=1)
    fields = receptive_fields(model, (3, 64, 64))
    assert fields["layer4-1-conv2"] == 435
    with SaturationTracker("unused", save_to="csv", modules=model, nosave=True) as tracker:
        assert list(fields) == [name for name in tracker.layers if name in fields]
        assert set(fields) == set(tracker.layers)


# ------------------------------------------------------------- empirical check
def gradient_extent(model: nn.Module, length: int, axis_positions: range) -> int:
    """Largest span of input positions with non-zero gradient for one output position (all weights 1)."""
    for parameter in model.parameters():
        nn.init.constant_(parameter, 1.0)
    widest = 0
    x = torch.ones(1, 1, length, requires_grad=True)
    out = model(x)
    for position in axis_positions:
        (grad,) = torch.autograd.grad(out[0, 0, position], x, retain_graph=True)
        support = torch.nonzero(grad[0, 0]).flatten()
        widest = max(widest, int(support.max() - support.min()) + 1)
    return widest


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Conv1d(1, 1, 3, stride=2), nn.Conv1d(1, 1, 3, dilation=3), nn.AvgPool1d(3, 2), nn.Conv1d(1, 1, 5)],
        [nn.Conv1d(1, 1, 3, stride=2), nn.ConvTranspose1d(1, 1, 4, stride=2), nn.Conv1d(1, 1, 3)],
        [nn.Conv1d(1, 1, 5, stride=3), nn.ConvTranspose1d(1, 1, 3, stride=2), nn.Conv1d(1, 1, 2, dilation=2)],
        [nn.Conv1d(1, 1, 3), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(1, 1, 3, stride=2)],
    ],
)
def test_fields_equal_the_gradient_support(layers: list) -> None:
    model = nn.Sequential(*layers)
    length = 96
    out_length = model(torch.zeros(1, 1, length)).shape[-1]
    inner = range(out_length // 4, 3 * out_length // 4)
    fields = receptive_fields(model, (1, length))
    last = list(fields)[-1]
    assert fields[last] == gradient_extent(model, length, inner)


# ------------------------------------------------------------- graph features
class Functional(nn.Module):
    """Pooling, residual sums and global reductions written as functions in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 5, padding=2)
        self.after = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)  # 3 -> 4, j=2
        x = x + self.branch(x)  # max(4, 4 + 4 * 2 = 12) = 12
        x = torch.cat([x, x], dim=1)[:, :4]
        x = self.after(x)  # 12 + 2 * 2 = 16
        return self.head(x.mean(dim=(2, 3)))


def test_functional_ops_residual_sum_and_global_reduction() -> None:
    model = Functional()
    traced = trace_receptive_fields(model, (1, 16, 16))
    assert {n: layer.receptive_field[0] for n, layer in traced.items()} == {
        "stem": 3, "branch": 12, "after": 16, "head": math.inf,
    }
    assert traced["after"].input_receptive_field == (12, 12)
    assert traced["after"].jump == (2, 2)
    assert "unused" not in traced
    assert unproductive_layers(model, (1, 12, 12)) == ["after"]
    assert unproductive_layers(model, (1, 16, 16)) == []


def test_rectangular_input_and_anisotropic_kernels() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, (1, 5), padding=(0, 2)), nn.Conv2d(2, 2, (3, 1), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(2, 2, 3, padding=1),
    )
    assert dict(receptive_fields(model, (1, 20, 30), per_axis=True)) == {
        "0": (1, 5), "1": (3, 5), "2": (7, 7),
    }
    assert receptive_fields(model, (1, 20, 30))["1"] == 5
    # 5 >= 4 across but 3 < 4 down: the last layer still adds context along the first axis.
    assert unproductive_layers(model, (1, 4, 4)) == []
    assert unproductive_layers(model, (1, 3, 4)) == ["2"]


def test_adaptive_pooling_is_global_and_flags_are_restored() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    model.train()
    fields = receptive_fields(model, (1, 9, 9))
    assert fields == {"0": 3, "4": math.inf}
    assert all(module.training for module in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_input_size_names_the_parameter() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="input_size=.*too small"):
        receptive_fields(model, (1, 2, 2))
    for bad in ["32", (32,), (1, 0, 4), 3.5, True]:
        with pytest.raises(ValueError, match="input_size"):
            receptive_fields(model, bad)
    with pytest.raises(ValueError, match="input_size"):
        receptive_fields(nn.Sequential(nn.Conv1d(1, 1, 3)), 16)


def test_json_round_trip(tmp_path) -> None:
    model = VGG16(width=16)
    path = tmp_path / "rf.json"
    document = save_receptive_fields(str(path), model, (3, 32, 32))
    assert document["input_size"] == [32, 32]
    size, layers = load_receptive_fields(str(path))
    assert size == (32, 32)
    assert layers == trace_receptive_fields(model, (3, 32, 32))
    assert [n for n, layer in layers.items() if layer.unproductive] == unproductive_layers(model, 32)
