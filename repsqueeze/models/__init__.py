"""Models built from squeezable blocks; importing this package registers them all."""

from repsqueeze.models.create import create_model
from repsqueeze.models.finetune import freeze, match_parameters, parameter_groups, unfreeze
from repsqueeze.models.layers import (
    ConvClassifier,
    FeatureInfo,
    FeatureNet,
    SqueezeExcite,
    block_act,
    make_stages,
)
from repsqueeze.models.mobileone import (
    MobileOne,
    mobileone_s0,
    mobileone_s1,
    mobileone_s2,
    mobileone_s3,
    mobileone_s4,
)
from repsqueeze.models.pretrained import LoadReport, load_pretrained
from repsqueeze.models.registry import list_models, register_model, unregister_model
from repsqueeze.models.repvgg import RepVGG, repvgg_a0, repvgg_a1, repvgg_b0
from repsqueeze.models.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    resnet18,
    resnet20_cifar,
    resnet50,
    resnet56_cifar,
)
from repsqueeze.models.small import digits_net

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ConvClassifier",
    "FeatureInfo",
    "FeatureNet",
    "LoadReport",
    "MobileOne",
    "RepVGG",
    "ResNet",
    "SqueezeExcite",
    "block_act",
    "create_model",
    "digits_net",
    "freeze",
    "list_models",
    "load_pretrained",
    "make_stages",
    "match_parameters",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "parameter_groups",
    "register_model",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_b0",
    "resnet18",
    "resnet20_cifar",
    "resnet50",
    "resnet56_cifar",
    "unfreeze",
    "unregister_model",
]
