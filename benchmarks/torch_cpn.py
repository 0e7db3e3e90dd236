"""A PyTorch CPN-50 for the training-speed reference (benchmarks/train_speed.py ``torch``).

The layout of the public PyTorch CPN (GengDavid/pytorch-cpn: ``resnet.py``, ``globalNet.py``,
``refineNet.py``, ``train.py``): a torchvision-style ResNet-50 tapping C2..C5, a GlobalNet
with lateral 1x1 convs, upsample + 1x1 conv merges and one heatmap head per level (upsampled
to stride 4, then BN), a RefineNet with 0..3 bottlenecks per level, concat, one bottleneck and
a 3x3 head; losses as its train.py: GlobalNet MSE against four precomputed heatmap targets,
RefineNet per-channel MSE with online hard keypoint mining (top 8). Plain torch (no
torchvision), built here so the reference needs only ``pip install torch``.

Example:
    >>> model = build_torch_cpn(17)                                # doctest: +SKIP
    >>> step = torch_step(model, batch=2, input_size=(256, 192), keypoints=17)  # doctest: +SKIP
    >>> step()                                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, expansion: int = 4,
                 downsample: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        out = planes * expansion
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        if downsample is None:
            downsample = stride != 1 or inplanes != out
        self.down = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                   nn.BatchNorm2d(out)) if downsample else None)  # fmt: skip

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))  # fmt: skip
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            mods = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * 4
            mods += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*mods))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats[::-1]  # C5, C4, C3, C2 as pytorch-cpn


def _conv_bn(cin: int, cout: int, k: int, relu: bool = True) -> nn.Sequential:
    mods = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*mods, nn.ReLU(inplace=True)) if relu else nn.Sequential(*mods)


class GlobalNet(nn.Module):
    def __init__(self, channels, out_shape, num_class: int) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.laterals = nn.ModuleList(_conv_bn(c, 256, 1) for c in channels)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                          nn.Conv2d(256, 256, 1), nn.BatchNorm2d(256))
            for _ in range(len(channels) - 1))  # fmt: skip
        self.predicts = nn.ModuleList(
            nn.Sequential(_conv_bn(256, 256, 1), nn.Conv2d(256, num_class, 3, padding=1,
                          bias=False), nn.Upsample(size=out_shape, mode="bilinear",
                          align_corners=True), nn.BatchNorm2d(num_class))
            for _ in channels)  # fmt: skip

    def forward(self, feats):
        fms, outs, up = [], [], None
        for i, x in enumerate(feats):
            x = self.laterals[i](x)
            if up is not None:
                x = x + up
            fms.append(x)
            if i < len(feats) - 1:
                up = self.ups[i](x)
            outs.append(self.predicts[i](x))
        return fms, outs


class RefineNet(nn.Module):
    def __init__(self, out_shape, num_class: int, num_cascade: int = 4) -> None:
        super().__init__()
        self.cascades = nn.ModuleList()
        for i in range(num_cascade):
            blocks = [Bottleneck(256, 128, expansion=2, downsample=True) if j == 0
                      else Bottleneck(256, 128, expansion=2)
                      for j in range(num_cascade - i - 1)]  # fmt: skip
            self.cascades.append(nn.Sequential(*blocks, nn.Upsample(
                size=out_shape, mode="bilinear", align_corners=True)))  # fmt: skip
        self.final = nn.Sequential(Bottleneck(4 * 256, 128, expansion=2, downsample=True),
                                   nn.Conv2d(256, num_class, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(num_class))  # fmt: skip

    def forward(self, fms):
        return self.final(torch.cat([c(x) for c, x in zip(self.cascades, fms, strict=True)], 1))


class TorchCPN(nn.Module):
    def __init__(self, num_class: int, input_size=(256, 192)) -> None:
        super().__init__()
        out_shape = (input_size[0] // 4, input_size[1] // 4)
        self.resnet = ResNet50()
        self.global_net = GlobalNet((2048, 1024, 512, 256), out_shape, num_class)
        self.refine_net = RefineNet(out_shape, num_class)
        self.register_buffer("mean", torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1))

    def forward(self, x):
        fms, global_outs = self.global_net(self.resnet((x - self.mean) / self.std))
        return global_outs, self.refine_net(fms)


def build_torch_cpn(num_class: int, input_size=(256, 192)) -> TorchCPN:
    """The PyTorch CPN-50 (random weights)."""
    return TorchCPN(num_class, input_size)


def _gaussian_targets(keypoints: np.ndarray, shape, sigma: float) -> np.ndarray:
    """Heatmaps [B, K, h, w] (pytorch-cpn renders them in its data loader, on the CPU)."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype("float32")
    x, y = keypoints[..., 0, None, None], keypoints[..., 1, None, None]
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)).astype("float32")


def torch_step(model: TorchCPN, batch: int, input_size, keypoints: int,
               precision: str = "float32") -> Callable[[], float]:
    """One training step of pytorch-cpn's train.py (Adam, global L2 + OHKM top 8).

    ``precision="mixed_bfloat16"``: the forward pass under ``torch.autocast("cpu",
    torch.bfloat16)`` (PyTorch's counterpart of Keras' mixed_bfloat16; weights stay float32).
    """
    if precision not in ("float32", "mixed_bfloat16"):
        raise ValueError(f"torch reference: precision {precision!r} not supported on a CPU")
    rng = np.random.default_rng(0)
    h, w = input_size[0] // 4, input_size[1] // 4
    images = torch.from_numpy(rng.uniform(0, 255, (batch, 3, *input_size)).astype("float32"))
    images = images.contiguous(memory_format=torch.channels_last)
    kp = rng.uniform(2, [w - 3, h - 3], (batch, keypoints, 2))
    targets = [torch.from_numpy(_gaussian_targets(kp, (h, w), s)) for s in (7, 9, 11, 15)]
    valid = torch.ones(batch, keypoints, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-5)
    model.train()

    autocast = precision == "mixed_bfloat16"

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            global_outs, refine = model(images)
        global_outs, refine = [o.float() for o in global_outs], refine.float()
        loss = 0.0
        for out, target in zip(global_outs, targets, strict=True):
            loss = loss + F.mse_loss(out * valid[..., None], target * valid[..., None]) / 2
        per = F.mse_loss(refine, targets[3], reduction="none").mean(dim=(2, 3)) * valid[..., 0]
        top = torch.topk(per, min(8, keypoints), dim=1)[0]
        loss = loss + top.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step
