"""Models built from squeezable blocks; importing this package registers them all."""

from repsqueeze.models.layers import ConvClassifier, block_act, make_stages
from repsqueeze.models.registry import create_model, list_models, register_model
from repsqueeze.models.repvgg import RepVGG, repvgg_a0, repvgg_a1, repvgg_b0
from repsqueeze.models.resnet import BasicBlock, CifarResNet, resnet20_cifar, resnet56_cifar
from repsqueeze.models.small import digits_net

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ConvClassifier",
    "RepVGG",
    "block_act",
    "create_model",
    "digits_net",
    "list_models",
    "make_stages",
    "register_model",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_b0",
    "resnet20_cifar",
    "resnet56_cifar",
]
