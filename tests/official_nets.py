"""Small re-creations of the official repositories' networks, for the pretrained-loading tests.

Written here from the papers and the repositories' module naming (the key layout is what a
checkpoint of theirs holds), each with its own plain forward: the oracle the loaded
repsqueeze network is compared with. Not imported by the library.

* RepVGG (github.com/DingXiaoH/RepVGG): ``stage0``, ``stage1..4`` of blocks ``rbr_dense``
  (conv + bn), ``rbr_1x1`` (conv + bn), ``rbr_identity`` (bn), ``se`` (``down`` / ``up``)
  before the ReLU, groups on layers 2, 4, ..., 26; deployed: ``rbr_reparam``; ``linear``.
* QARepVGG (github.com/cxxgtxy/QARepVGG, ``QARepVGGBlockV2``): ``rbr_dense`` (conv + bn),
  ``rbr_1x1`` a bare conv, identity without parameters, a trailing ``bn``.
* MobileOne (github.com/apple/ml-mobileone): ``rbr_conv.i`` (conv + bn), ``rbr_scale``,
  ``rbr_skip``, ``se`` (``reduce`` / ``expand``); stages of depthwise / pointwise pairs.
* The DBB / ACNet ResNet (github.com/DingXiaoH/DiverseBranchBlock): ``stage0.conv1`` (7x7
  ConvBN) + max pool, ``stageK.N.conv1/conv2[/conv3]/shortcut``, ACNet blocks
  ``square_conv/bn``, ``ver_conv/bn``, ``hor_conv/bn`` for the 3x3 convs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c_in, c_out, k, stride=1, padding=0, groups=1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(c_out),
        )
    )


class SE(nn.Module):
    def __init__(self, c: int, hidden: int, names=("down", "up")) -> None:
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Conv2d(c, hidden, 1))
        setattr(self, names[1], nn.Conv2d(hidden, c, 1))

    def forward(self, x):
        s = F.avg_pool2d(x, x.shape[-1])
        s = torch.sigmoid(getattr(self, self.names[1])(F.relu(getattr(self, self.names[0])(s))))
        return x * s


class RepVGGBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1, groups=1, use_se=False, deploy=False, qa=False):
        super().__init__()
        self.se = SE(c_out, c_out // 16) if use_se else nn.Identity()
        self.qa = qa
        if deploy:
            self.rbr_reparam = nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups)
            return
        same = c_in == c_out and stride == 1
        self.rbr_dense = conv_bn(c_in, c_out, 3, stride, 1, groups)
        if qa:
            self.rbr_1x1 = nn.Conv2d(c_in, c_out, 1, stride, groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if same else None
            self.bn = nn.BatchNorm2d(c_out)
        else:
            self.rbr_1x1 = conv_bn(c_in, c_out, 1, stride, 0, groups)
            self.rbr_identity = nn.BatchNorm2d(c_in) if same else None

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return F.relu(self.se(self.rbr_reparam(x)))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        if self.qa:
            y = self.bn(y)
        return F.relu(self.se(y))


class RepVGG(nn.Module):
    """The official RepVGG / QARepVGG network layout."""

    def __init__(self, num_blocks, width, num_classes=10, groups=1, use_se=False, **block_kw):
        super().__init__()
        planes = min(64, int(64 * width[0]))
        self.stage0 = RepVGGBlock(3, planes, 2, use_se=use_se, **block_kw)
        layer = 1
        for i, (n, c, f) in enumerate(
            zip(num_blocks, (64, 128, 256, 512), width, strict=True), start=1
        ):
            blocks = []
            for j in range(n):
                g = groups if layer in range(2, 27, 2) else 1
                blocks.append(
                    RepVGGBlock(planes, int(c * f), 2 if j == 0 else 1, g, use_se, **block_kw)
                )
                planes, layer = int(c * f), layer + 1
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return self.linear(x.mean((2, 3)))


class MobileOneBlock(nn.Module):
    def __init__(self, c_in, c_out, k, stride=1, groups=1, branches=1, use_se=False):
        super().__init__()
        self.se = SE(c_out, int(c_out * 0.0625), ("reduce", "expand")) if use_se else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(c_in, c_out, k, stride, k // 2, groups) for _ in range(branches)
        )
        self.rbr_scale = conv_bn(c_in, c_out, 1, stride, 0, groups) if k > 1 else None

    def forward(self, x):
        y = sum(b(x) for b in self.rbr_conv)
        if self.rbr_scale is not None:
            y = y + self.rbr_scale(x)
        if self.rbr_skip is not None:
            y = y + self.rbr_skip(x)
        return F.relu(self.se(y))


class MobileOne(nn.Module):
    """The official MobileOne network layout."""

    def __init__(
        self, width, num_blocks=(2, 8, 10, 1), branches=1, se=(0, 0, 0, 0), num_classes=10
    ):
        super().__init__()
        planes = min(64, int(64 * width[0]))
        self.stage0 = MobileOneBlock(3, planes, 3, 2)  # one branch, whatever num_conv_branches
        for i, (n, c, f, s) in enumerate(
            zip(num_blocks, (64, 128, 256, 512), width, se, strict=True), start=1
        ):
            blocks = []
            for j in range(n):
                use_se = j >= n - s
                blocks.append(MobileOneBlock(planes, planes, 3, 2 if j == 0 else 1, planes, branches, use_se))  # fmt: skip
                blocks.append(MobileOneBlock(planes, int(c * f), 1, 1, 1, branches, use_se))
                planes = int(c * f)
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return self.linear(x.mean((2, 3)))


class ConvBN(nn.Module):
    def __init__(self, c_in, c_out, k, stride=1, padding=0, act=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.nonlinear = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.nonlinear(self.bn(self.conv(x)))


class ACB(nn.Module):
    def __init__(self, c_in, c_out, stride=1, act=False):
        super().__init__()
        for name, k, p in (("square", (3, 3), (1, 1)), ("ver", (3, 1), (1, 0)), ("hor", (1, 3), (0, 1))):  # fmt: skip
            setattr(self, f"{name}_conv", nn.Conv2d(c_in, c_out, k, stride, p, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(c_out))
        self.nonlinear = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        y = sum(getattr(self, f"{n}_bn")(getattr(self, f"{n}_conv")(x)) for n in ("square", "ver", "hor"))  # fmt: skip
        return self.nonlinear(y)


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then a border of width ``pad`` filled with BN's value for 0."""

    def __init__(self, c: int, pad: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x):
        y = F.pad(self.bn(x), [self.pad] * 4)
        bn = self.bn
        value = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
        inner = torch.zeros_like(y, dtype=torch.bool)
        inner[..., self.pad : -self.pad, self.pad : -self.pad] = True
        return torch.where(inner, y, value.view(1, -1, 1, 1).expand_as(y))


class IdentityBased1x1(nn.Conv2d):
    """DBB's IdentityBasedConv1x1: stores its kernel minus the identity (groups 1 here)."""

    def __init__(self, c: int) -> None:
        super().__init__(c, c, 1, bias=False)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.weight + torch.eye(self.in_channels, dtype=x.dtype)[..., None, None])  # fmt: skip


class DBB(nn.Module):
    """The Diverse Branch Block (groups 1): k x k, 1x1, 1x1 -> k x k, 1x1 -> avg, each with BN."""

    def __init__(self, c_in, c_out, stride=1, act=False):
        super().__init__()
        self.dbb_origin = conv_bn(c_in, c_out, 3, stride, 1)
        self.dbb_1x1 = conv_bn(c_in, c_out, 1, stride, 0)
        self.dbb_avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 1, bias=False), bn=BNAndPad(c_out),
                avg=nn.AvgPool2d(3, stride, 0), avgbn=nn.BatchNorm2d(c_out),
            )
        )  # fmt: skip
        self.dbb_1x1_kxk = nn.Sequential(
            OrderedDict(
                idconv1=IdentityBased1x1(c_in), bn1=BNAndPad(c_in),
                conv2=nn.Conv2d(c_in, c_out, 3, stride, 0, bias=False), bn2=nn.BatchNorm2d(c_out),
            )
        )  # fmt: skip
        self.nonlinear = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        y = self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        return self.nonlinear(y)


class BasicBlock(nn.Module):
    def __init__(self, c_in, planes, stride, conv3x3):
        super().__init__()
        self.shortcut = ConvBN(c_in, planes, 1, stride) if stride != 1 or c_in != planes else nn.Identity()  # fmt: skip
        self.conv1 = conv3x3(c_in, planes, stride, act=True)
        self.conv2 = conv3x3(planes, planes, 1)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The DBB repository's ResNet-18 layout, with DBB, ACNet (``acb``) or plain 3x3 ConvBNs."""

    def __init__(self, kind="acb", num_classes=10):
        super().__init__()
        blocks = {"acb": ACB, "dbb": DBB}
        conv3x3 = blocks.get(kind, lambda i, o, s, act=False: ConvBN(i, o, 3, s, 1, act))
        self.stage0 = nn.Sequential(
            OrderedDict(conv1=ConvBN(3, 64, 7, 2, 3, act=True), maxpool=nn.MaxPool2d(3, 2, 1))
        )
        c = 64
        for i, planes in enumerate((64, 128, 256, 512), start=1):
            blocks = [BasicBlock(c, planes, 1 if i == 1 else 2, conv3x3), BasicBlock(planes, planes, 1, conv3x3)]  # fmt: skip
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
            c = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return self.linear(x.mean((2, 3)))
