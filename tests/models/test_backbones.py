"""The backbone interface of every registered model (timm's conventions): ``forward_features``,
``forward_head``, ``reset_classifier``, ``feature_info`` and ``create_model(...,
features_only=True, out_indices=...)``, deployed like the classifier."""

import pytest
import torch
from helpers import assert_equivalent, randomize
from torch import nn

import repsqueeze as rs
from repsqueeze.models import FeatureNet, unregister_model

pytestmark = pytest.mark.usefixtures("single_thread")


FAST = {"digits_net", "resnet20_cifar", "repvgg_a0", "repvgg_d2se", "mobileone_s0", "resnet50"}


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return rs.create_model(name, in_channels=3, **kwargs)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in rs.list_models()]
)
def test_backbone_interface_shapes(name):
    model = _meta(name, num_classes=7)
    info = model.feature_info
    x = torch.empty(2, 3, 64, 64, device="meta")
    maps = FeatureNet(model, range(len(info)))(x)  # one forward: every level
    assert [m.shape[1] for m in maps] == info.channels()
    assert [64 // m.shape[-1] for m in maps] == info.reduction()
    assert info.module_name()[0] == "stem" and maps[-1].shape[1] == model.num_features
    assert model.forward_head(maps[-1]).shape == (2, 7)
    assert model.forward_head(maps[-1], pre_logits=True).shape == (2, model.num_features)
    picked = _meta(name, features_only=True, out_indices=(1, -1))
    assert picked.feature_info.channels() == [info.channels()[1], info.channels()[-1]]
    assert picked.out_indices == (1, len(info) - 1) and len(picked.stages) == len(info) - 1
    with torch.device("meta"):
        model.reset_classifier(3)
    assert model.forward_head(maps[-1]).shape == (2, 3)
    assert model.get_classifier().out_features == model.num_classes == 3
    model.reset_classifier(0)
    assert model.forward_head(maps[-1]).shape == (2, model.num_features)


def test_features_deploy_and_load_like_the_classifier(generator):
    torch.manual_seed(0)
    net = randomize(rs.create_model("resnet20_cifar", block="dbb"), generator).double().eval()
    feats = rs.create_model("resnet20_cifar", block="dbb", features_only=True, out_indices=(0, 2))
    assert isinstance(feats, FeatureNet) and len(feats.stages) == 2  # stage 3 is dropped
    missing, unexpected = feats.load_state_dict(net.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == {"head.weight", "head.bias"} | {
        k for k in net.state_dict() if k.startswith("stages.2.")
    }
    feats = feats.double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        trained = feats(x)
        deployed = rs.deploy(feats)(x)
        assert [f.shape for f in trained] == [(2, 16, 16, 16), (2, 32, 8, 8)]
        for a, b in zip(deployed, trained, strict=True):
            assert_equivalent(a, b, 1e-10)
        assert torch.equal(trained[1], net.stages[:2](net.stem(x)))


def test_features_only_refuses_bad_levels():
    with pytest.raises(
        ValueError, match=r"out_indices \(5,\) has 5; ConvClassifier has levels 0..2"
    ):
        rs.create_model("digits_net", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="distinct levels"):
        rs.create_model("digits_net", features_only=True, out_indices=(1, -2))

    def no_levels(**kwargs):
        return nn.Identity()

    rs.register_model(no_levels)
    try:
        with pytest.raises(ValueError, match="no_levels: features_only needs"):
            rs.create_model("no_levels", features_only=True)
    finally:
        unregister_model("no_levels")
