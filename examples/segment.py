"""A small segmentation network on a repsqueeze backbone: train, deploy, export to ONNX.

    python examples/segment.py                        # resnet20_cifar backbone, RepVGG blocks
    python examples/segment.py --block dbb --steps 100
    python examples/segment.py --model repvgg_a0 --pretrained timm:repvgg_a0.rvgg_in1k

The backbone is ``create_model(..., features_only=True)``: its multi-scale feature maps feed
a light FPN-style head (a 1x1 projection per level, upsampled and summed, then a
re-parameterizable 3x3 block and a 1x1 classifier). The data are synthetic: noise images
with bright rectangles, the task is to mark the rectangles' pixels. After a few training
steps the whole network (backbone and head) is deployed with ``rs.deploy``, checked against
the training form, and exported to ``segment.onnx``, which onnxruntime runs and is checked
too (``pip install 'repsqueeze[export]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import repsqueeze as rs
from repsqueeze import export


class SegNet(nn.Module):
    """Backbone feature maps -> per-pixel class logits at the input resolution.

    Args:
        backbone: a ``features_only`` model (its ``feature_info`` gives the channels).
        num_classes: classes per pixel.
        block: block kind of the head's 3x3 conv.
        width: channels of the head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, block: str, width: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, width, 1) for c in backbone.feature_info.channels()
        )
        self.fuse = nn.Sequential(rs.make_block(block, width, width, 3), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        fused = sum(
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(self.lateral, self.backbone(x), strict=True)
        )  # (N, width, H, W)
        return self.classifier(self.fuse(fused))  # (N, num_classes, H, W)


def synthetic_batch(n: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise images with one bright rectangle each; the mask marks its pixels (class 1)."""
    x = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    mask = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - size // 2, (2,), generator=generator))
        mask[i, top : top + h, left : left + w] = 1
    colour = torch.rand(n, 3, 1, 1, generator=generator) + 0.5
    return x + colour * mask[:, None], mask


def iou(logits: Tensor, mask: Tensor) -> float:
    """Intersection over union of the predicted foreground."""
    pred = logits.argmax(1) == 1
    truth = mask == 1
    return float((pred & truth).sum() / (pred | truth).sum().clamp_min(1))


def relative(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20_cifar", help="a registered model")
    parser.add_argument("--block", default="repvgg", help="block kind (see rs.BLOCKS)")
    parser.add_argument("--pretrained", default=None, help="create_model's pretrained=")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--out", type=Path, default=Path("segment_out"), help="output folder")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"pretrained": args.pretrained} if args.pretrained else {}
    backbone = rs.create_model(
        args.model, block=args.block, in_channels=3, features_only=True, **kwargs
    )
    model = SegNet(backbone, num_classes=2, block=args.block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(args.steps):
        x, mask = synthetic_batch(args.batch, args.size, generator)
        loss = F.cross_entropy(model(x), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    model.eval()
    x, mask = synthetic_batch(args.batch, args.size, generator)
    deployed = rs.deploy(model)
    with torch.no_grad():
        logits = model(x)
        logits_deployed = deployed(x)
    result = {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "iou": iou(logits, mask),
        "deploy_rel_diff": relative(logits_deployed, logits),
        "params": sum(p.numel() for p in model.parameters()),
        "params_deployed": sum(p.numel() for p in deployed.parameters()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_onnx:
        path = args.out / "segment.onnx"
        export.to_onnx(deployed, path, x[:2])
        result["onnx"] = str(path)
        result["onnx_rel_diff"] = relative(export.run_onnx(path, x[:2]), logits[:2])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
