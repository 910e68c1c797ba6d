"""Whole-model conversions: deploy every re-parameterizable block of any ``nn.Module``."""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable, SqueezableBlock
from repsqueeze.core.hooks import check_inner_hooks
from repsqueeze.core.squeeze import composites, deploy_blocks

# Method names other libraries use for "switch this block to its deployed form":
# timm/MobileOne ``reparameterize``, RepVGG/DBB/ACNet ``switch_to_deploy``, YOLO-style ``fuse``.
FOREIGN_HOOKS = ("reparameterize", "switch_to_deploy", "fuse")


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False, unwrap: bool = False) -> nn.Module:
    """Collapses every squeezable block of ``model`` into one convolution.

    Our blocks are deployed with :meth:`Squeezable.deploy`; blocks of other libraries that
    follow the common conventions (a ``reparameterize()``, ``switch_to_deploy()`` or
    ``fuse()`` method taking no required argument) are deployed by calling that method, and
    a module the method returns takes the block's place in its parent (timm's ``fuse()``
    convention; ``reparameterize()`` works in place). Idempotent. A block used at several
    places of the model is deployed once and stays shared.

    A ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper is taken
    off: the module it wraps is deployed and returned, unwrapped (a deployed model is for
    inference; wrap it again if needed). BatchNorm is always folded with its running
    statistics, as in eval mode; a block still in training mode gets a warning, and each
    module keeps its mode (call ``.eval()`` on the result for inference).

    Args:
        model: any module.
        inplace: mutate ``model``; by default a deep copy is deployed and ``model`` is
            left untouched.
        unwrap: replace each deployed block of ours by its bare ``nn.ConvNd``, so the model
            holds only torch modules (no repsqueeze import needed to load its ``state_dict``
            or the whole pickled module: keys lose the block's ``.conv``, and what
            :func:`expand` attached for :func:`contract` is dropped), and no block's
            ``forward`` runs per call. A block used twice becomes one convolution used twice.

    Returns:
        The deployed model (``model`` itself when ``inplace``, unless a hook of ``model``
        itself returned a replacement; with ``unwrap``, the bare convolution when ``model`` is
        itself a block).
    """
    _check_module("deploy", model)
    model = _without_wrappers(model)
    _check_blocks(model)
    _warn_if_training(model)
    model = deploy_blocks(model, _top_blocks(model, "", set()), inplace)
    model = _deploy_tree(model, "")  # other libraries' blocks; ours are deployed already
    return _unwrap(model, {}) if unwrap else model


def _top_blocks(module: nn.Module, path: str, seen: set[int]) -> list[tuple[str, Squeezable]]:
    """``(path, block)`` of the outermost blocks of ours not deployed yet, in model order,
    each once (``seen``: the modules visited, so that a shared block is listed once)."""
    if id(module) in seen:
        return []
    seen.add(id(module))
    if isinstance(module, Squeezable):
        return [] if module.deployed else [(path, module)]
    found = []
    for name, child in module._modules.items():  # not named_children: shared ones too
        if child is not None:
            found += _top_blocks(child, f"{path}.{name}" if path else name, seen)
    return found


def _check_module(what: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")


def _wrappers() -> list[tuple[type, str]]:
    """``(class, attribute holding the wrapped module)`` of DDP, DataParallel, compile."""
    wrappers = [(nn.parallel.DistributedDataParallel, "module"), (nn.DataParallel, "module")]
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # no compiled module without it
    if dynamo is not None:
        wrappers.append((dynamo.OptimizedModule, "_orig_mod"))
    return wrappers


def _without_wrappers(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers, nested or not."""
    while True:
        attr = next((a for cls, a in _wrappers() if isinstance(model, cls)), None)
        if attr is None:
            return model
        model = getattr(model, attr)


def _check_blocks(model: nn.Module) -> None:
    """Refuses, before anything is copied, hooks on layers inside blocks that deploying would
    ignore (old-style weight norms cannot even be deep-copied)."""
    for path, m in model.named_modules():
        if isinstance(m, Squeezable) and not m.deployed:
            try:
                check_inner_hooks(m, "deploy")
            except ValueError as err:
                raise ValueError(f"{path}: {err}" if path else str(err)) from err


TRAINING_WARNING = (
    "deploy: blocks in training mode are folded with their BatchNorm running statistics (as "
    "in eval mode), and the deployed model keeps each module's mode; call model.eval() first"
)


def _warn_if_training(model: nn.Module) -> None:
    """One warning when a block (ours, or one with a foreign hook) left to deploy trains."""
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, Squeezable):
            pending = not m.deployed
        else:
            pending = any(_is_hook(getattr(m, h, None)) for h in FOREIGN_HOOKS)
        if pending:
            warnings.warn(TRAINING_WARNING, UserWarning, stacklevel=4)  # deploy's caller
            return


def _unwrap(module: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """``module`` with each deployed block replaced by its conv (``done``: what each module
    already visited became, so that a shared block becomes one shared conv)."""
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, Squeezable):
        done[id(module)] = module.conv
        return module.conv
    done[id(module)] = module
    if isinstance(getattr(module, ORIGIN, None), Origin):
        delattr(module, ORIGIN)  # only contract() reads it, and it needs the blocks
    for name, child in list(module._modules.items()):  # not named_children: shared ones too
        if child is not None:
            bare = _unwrap(child, done)
            if bare is not child:
                setattr(module, name, bare)
    return module


def _deploy_tree(
    module: nn.Module, path: str, done: dict[int, nn.Module | None] | None = None
) -> nn.Module:
    """Deploys ``module`` and everything below it; returns what takes its place.

    ``path``: where ``module`` sits (prefixed to a block's error). ``done``: what each module
    visited became (``None`` while below it is deployed), so that a module used twice is
    deployed once and its replacement shared, and a replacement that wraps the old module
    does not run its hook again."""
    done = {} if done is None else done
    key = id(module)
    if done.get(key) is not None:
        return done[key]
    if isinstance(module, Squeezable):
        try:
            module.deploy()
        except ValueError as err:  # the block's message names layers inside it: add where it is
            raise ValueError(f"{path}: {err}" if path else str(err)) from err
        done[key] = module
        return module
    if key not in done:
        done[key] = None
        for hook in FOREIGN_HOOKS:
            method = getattr(module, hook, None)
            if _is_hook(method):
                out = method()
                if isinstance(out, nn.Module):
                    module = out
                break
    for name, child in list(module._modules.items()):  # not named_children: shared ones too
        if child is not None:
            new = _deploy_tree(child, f"{path}.{name}" if path else name, done)
            if new is not child:
                setattr(module, name, new)
    done[key] = module
    return module


def _is_hook(method) -> bool:
    """A method (not a child module named like one) that takes no required argument."""
    if not callable(method) or isinstance(method, nn.Module):
        return False
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): do not guess
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def set_mode(model: nn.Module, mode: str, recompute: bool | None = None) -> nn.Module:
    """Sets ``mode`` (``"chain"``, ``"online"`` or ``"auto"``) on every top-level block.

    Args:
        model: any module.
        mode: see :meth:`repsqueeze.core.blocks.Squeezable.set_mode`.
        recompute: chain mode recomputes each block's inner activations during backward
            instead of keeping them (see :meth:`~repsqueeze.core.blocks.Squeezable.set_mode`);
            ``None`` leaves each block's setting as it is.

    Returns:
        ``model``, changed in place.
    """
    from repsqueeze.core.blocks import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, Squeezable):
        model.set_mode(mode, recompute)
        return model
    for child in model.children():
        set_mode(child, mode, recompute)
    return model


@dataclass
class BorderReport:
    """What :func:`make_border_consistent` changed.

    Attributes:
        rewritten: paths of the new blocks, each with the layers it took over.
        skipped: ``(path, reason)`` for linear runs that could not be rewritten.
        border_change: per new block, the largest change of its output at the border
            (relative to its output scale) on the sample input.
        interior_change: the same away from the border (zero up to rounding).
        output_change: largest change of the model's output, relative to its scale.
    """

    rewritten: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    border_change: dict[str, float] = field(default_factory=dict)
    interior_change: dict[str, float] = field(default_factory=dict)
    output_change: float | None = None


def make_border_consistent(
    model: nn.Module, sample: Tensor | None = None, inplace: bool = False
) -> tuple[nn.Module, BorderReport]:
    """Rewrites linear runs of padded layers into :class:`SqueezableBlock` s, same weights.

    For a model trained as a naive chain (``conv -> conv``, ``conv -> BN -> conv`` with no
    non-linearity between, inside an ``nn.Sequential``): the rewritten model agrees with the
    old one away from the borders and differs at them, by an amount the report measures on
    ``sample``; a short fine-tune recovers the accuracy, and deploying is then exact.

    Args:
        model: any module; runs inside every ``nn.Sequential`` are considered.
        sample: an input batch to measure the change on (optional).
        inplace: mutate ``model`` instead of a deep copy.

    Returns:
        ``(new_model, report)``.
    """
    reference = copy.deepcopy(model) if sample is not None else None
    if not inplace:
        model = copy.deepcopy(model)
    report = BorderReport()
    _rewrite_runs(model, "", report)
    if reference is not None:
        _measure_border_change(reference, model, sample, report)
    return model, report


def _rewrite_runs(module: nn.Module, path: str, report: BorderReport) -> None:
    for name, child in list(module.named_children()):
        if not isinstance(child, Squeezable):
            _rewrite_runs(child, f"{path}{name}.", report)
    if not isinstance(module, nn.Sequential) or isinstance(module, Squeezable):
        return
    layers, out, run = list(module.named_children()), [], []
    for name, layer in [*layers, ("", None)]:
        if layer is not None and primitives.is_primitive(layer):
            run.append((name, layer))
            continue
        out += _squeeze_run(run, path, report)
        run = []
        if layer is not None:
            out.append((name, layer))
    if len(out) != len(layers):
        for name, _ in layers:
            delattr(module, name)
        for name, layer in out:
            module.add_module(name, layer)


def _squeeze_run(run: list[tuple[str, nn.Module]], path: str, report: BorderReport) -> list:
    convs = [m for _, m in run if isinstance(m, primitives.CONVS)]
    padded = [m for _, m in run if any(map(any, _pads(m)))]
    if len(convs) < 2 or not padded:
        return run  # already exact: at most one convolution, or nothing pads
    names = [f"{path}{n}" for n, _ in run]
    try:
        block = SqueezableBlock(*(m for _, m in run))
    except (TypeError, ValueError) as err:
        report.skipped.append((f"{names[0]}..{names[-1]}", str(err)))
        return run
    report.rewritten[f"{path}{run[0][0]}"] = names
    return [(run[0][0], block)]


def _pads(layer: nn.Module) -> tuple:
    ndim = primitives.ndim_of(layer) or 2
    return primitives.geometry(layer, ndim, "").pad


@torch.no_grad()
def _measure_border_change(old: nn.Module, new: nn.Module, x: Tensor, report: BorderReport) -> None:
    captured: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, p=p: captured.__setitem__(p, inp[0]))
        for p, m in _blocks_at(new, report.rewritten)
    ]
    modes = [(m, m.training) for m in (*old.modules(), *new.modules())]
    old.eval()
    new.eval()
    try:
        y_new, y_old = new(x), old(x)
        report.output_change = float(
            (y_new - y_old).abs().max() / y_old.abs().max().clamp_min(1e-30)
        )
        for p, block in _blocks_at(new, report.rewritten):
            _block_border_change(p, block, captured[p], report)
    finally:  # every module back in its own mode; no BatchNorm statistics were updated
        for m, training in modes:
            m.training = training
        for h in hooks:
            h.remove()


def _block_border_change(
    path: str, block: SqueezableBlock, x: Tensor, report: BorderReport
) -> None:
    """How far the block's output moved from the naive chain's, at and off the border."""
    a, b = nn.Sequential(*block.layers)(x), block(x)
    scale = float(a.abs().max().clamp_min(1e-30))
    geo = block.geometry(x.dim() - 2)
    margin = tuple(
        slice(-(-pl // s), a.shape[d + 2] - (-(-pr // s)))
        for d, ((pl, pr), s) in enumerate(zip(geo.pad, geo.stride, strict=True))
    )
    inner = (slice(None), slice(None), *margin)
    diff = (a - b).abs()
    report.interior_change[path] = float(diff[inner].max()) / scale if diff[inner].numel() else 0.0
    report.border_change[path] = float(diff.max()) / scale


def _blocks_at(model: nn.Module, paths: dict[str, list[str]]) -> list[tuple[str, SqueezableBlock]]:
    return [(p, model.get_submodule(p)) for p in paths]


@dataclass
class ExpandReport:
    """What :func:`expand` did: ``expanded`` maps each conv's path to its block kind (the
    BatchNorm after it became ``Identity``, or its activation for a norm + act module);
    ``skipped`` lists ``(path, reason)``."""

    expanded: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(eq=False)
class Origin:
    """What :func:`expand` replaced, for :func:`contract`: the conv and the norm as modules
    on the ``meta`` device (types and attributes, no weights). The block and the module
    left in the norm's place hold the same ``Origin`` (attribute ``ORIGIN``)."""

    conv: nn.Module
    norm: nn.Module


ORIGIN = "repsqueeze_origin"


@torch.no_grad()
def expand(
    model: nn.Module,
    block: str = "repvgg",
    inplace: bool = False,
    return_report: bool = False,
    **block_kwargs,
) -> nn.Module | tuple[nn.Module, ExpandReport]:
    """Turns an existing model into its over-parameterized training form.

    Each eligible convolution and the BatchNorm that consumes it become one block of kind
    ``block`` (its ``from_conv_bn``), initialised so that the function is unchanged (in
    eval and in training mode): the block's main path carries the old weights and
    statistics, every extra branch ends in a BatchNorm with zero scale and shift (ExpandNets
    chains start as an exact embedding of the old kernel). ``deploy(expand(model))`` has the
    layer shapes of ``model``; :func:`contract` gives back the original layer types.

    Eligible: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding whose
    output feeds only a ``BatchNorm`` (found by tracing with ``torch.fx``; inside an
    ``nn.Sequential`` when the model cannot be traced). A norm + activation module (timm's
    ``BatchNormAct2d``) counts as a BatchNorm: its BatchNorm part goes into the block, its
    ``drop`` and ``act`` stay in its place. torchvision's ``Conv2dNormActivation`` is a
    conv -> BatchNorm -> activation ``nn.Sequential``. Everything else stays as it is and
    is listed in the report, with the reason.

    Args:
        model: any module, e.g. a torchvision ResNet with pretrained weights loaded.
        block: a kind of :func:`repsqueeze.zoo.make_block` (``repvgg``, ``acb``, ``dbb``,
            ``mobileone``, ``expand_ck``, ``expand_cl``, ``plain``).
        inplace: mutate ``model`` instead of a deep copy.
        return_report: also return an :class:`ExpandReport`.
        **block_kwargs: further arguments of the blocks (``expansion``, ...).
    """
    from repsqueeze.zoo import BLOCKS

    if block not in BLOCKS:
        raise ValueError(f"unknown block kind {block!r}; valid kinds: {', '.join(BLOCKS)}")
    if block == "qarepvgg":
        raise ValueError(
            "expand: block='qarepvgg' cannot start as an exact copy of conv -> BatchNorm: its "
            "identity branch has no BatchNorm to zero and its output is normalised twice (in "
            "the k x k branch and after the sum); build it with make_block and train it"
        )
    if block_kwargs.get("online_norm"):
        raise ValueError(
            "expand: online_norm=True blocks have no BatchNorm to take over the old one"
        )
    _check_module("expand", model)
    wrapper = next((cls for cls, _ in _wrappers() if isinstance(model, cls)), None)
    if wrapper is not None:
        raise ValueError(
            f"expand: the model is wrapped in {wrapper.__name__}; expand the module inside "
            "before wrapping it (the wrapper holds on to the parameters it was built with)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    report = ExpandReport()
    foreign = []
    for conv_path, bn_path in _conv_bn_pairs(model, report):
        owner = _self_deploying_owner(model, conv_path) or _self_deploying_owner(model, bn_path)
        if owner is not None:
            foreign.append(owner)
            report.skipped.append((conv_path, f"inside {owner}, {FOREIGN_REASON}"))
            continue
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        try:
            new = block_from_conv_bn(block, conv, bn, **block_kwargs)
        except ValueError as err:
            report.skipped.append((conv_path, str(err)))
            continue
        origin = Origin(copy.deepcopy(conv).to("meta"), copy.deepcopy(bn).to("meta"))
        rest = (
            nn.Sequential(OrderedDict(bn.named_children())) if len(bn._modules) else nn.Identity()
        )
        setattr(new, ORIGIN, origin)
        setattr(rest, ORIGIN, origin)
        model.set_submodule(conv_path, new)
        model.set_submodule(bn_path, rest)
        report.expanded[conv_path] = block
    if foreign:
        warnings.warn(
            f"expand: {len(foreign)} conv(s) inside {len(set(foreign))} module(s) that "
            f"re-parameterize themselves were left as they are (first: {foreign[0]}); "
            "convert timm's RepVGG / MobileOne blocks with rs.from_timm instead",
            UserWarning,
            stacklevel=3,  # the caller of expand (torch.no_grad wraps it)
        )
    return (model, report) if return_report else model


FOREIGN_REASON = (
    "which re-parameterizes itself (reparameterize() / switch_to_deploy() / fuse()) from the "
    "layers it built, so a block in their place would break it; convert timm's RepVGG / "
    "MobileOne blocks with rs.from_timm instead"
)


def _self_deploying_owner(model: nn.Module, path: str) -> str | None:
    """The innermost module above ``path`` (the model included) that is not a block of ours
    and has a method of :data:`FOREIGN_HOOKS`, as ``path (Class)``; ``None`` if none."""
    owner, module, names = None, model, path.split(".")
    for depth, name in enumerate(names):
        if not isinstance(module, Squeezable) and any(
            _is_hook(getattr(module, h, None)) for h in FOREIGN_HOOKS
        ):
            owner = primitives.name_of(module, ".".join(names[:depth]) or "<model>")
        module = getattr(module, name)
    return owner


def block_from_conv_bn(kind: str, conv: nn.Module, bn: _BatchNorm, **kwargs) -> Squeezable:
    """A block of ``kind`` computing ``bn(conv(x))``: ``from_conv_bn`` of its class.

    Args:
        kind: a kind of :func:`repsqueeze.zoo.make_block`.
        conv: a ``ConvNd`` (square, odd kernel, dilation 1, centred padding).
        bn: the BatchNorm after it.
        **kwargs: further arguments of the block.
    """
    from repsqueeze.zoo import BLOCKS

    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; valid kinds: {', '.join(BLOCKS)}")
    make = BLOCKS[kind]
    if isinstance(make, partial):  # expand_ck / expand_cl: ExpandedConv with a fixed mode
        return make.func.from_conv_bn(conv, bn, **{**make.keywords, **kwargs})
    return make.from_conv_bn(conv, bn, **kwargs)


class _NormLeafTracer(torch.fx.Tracer):
    """Keeps every BatchNorm (timm's ``BatchNormAct2d`` too) a single ``call_module``."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module, report: ExpandReport) -> list[tuple[str, str]]:
    """``(conv path, bn path)`` where the conv's output goes only into that BatchNorm."""
    modules = dict(model.named_modules())
    try:
        graph = _NormLeafTracer().trace(model)
    except Exception as err:  # not traceable: fall back to nn.Sequential neighbours
        report.skipped.append(("<model>", f"not traceable with torch.fx ({type(err).__name__}); "
                                          "only conv -> BatchNorm neighbours in nn.Sequential were considered"))  # fmt: skip
        return _sequential_pairs(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), primitives.CONVS):
            continue
        users = list(node.users)
        bn = users[0] if len(users) == 1 else None
        if (
            bn is not None
            and bn.op == "call_module"
            and isinstance(modules.get(bn.target), _BatchNorm)
            and calls[node.target] == calls[bn.target] == 1
        ):
            pairs.append((node.target, bn.target))
        else:
            report.skipped.append((node.target, "its output does not go into a BatchNorm alone"))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential) and not isinstance(module, Squeezable):
            items = list(module.named_children())
            for (a, m), (b, n) in zip(items, items[1:], strict=False):
                if isinstance(m, primitives.CONVS) and isinstance(n, _BatchNorm):
                    prefix = f"{path}." if path else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def contract(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Gives an :func:`expand` -ed model back its original layer types, same function in eval.

    Every block :func:`expand` made becomes the conv and the norm it replaced (same classes
    and attributes, e.g. ``Conv2d(bias=False)`` + ``BatchNorm2d``), holding the block's
    squeezed kernel: the conv gets ``W * s / g`` and the norm keeps the running variance,
    eps, scale ``g`` and shift ``b`` of the block's main BatchNorm (``s = sqrt(var + eps)``),
    with the running mean set so that ``norm(conv(x))`` equals the block in eval mode (a
    channel with ``g == 0`` gets ``g = 1``). The result loads with ``strict=True`` into the
    original architecture and needs no repsqueeze. Blocks ``expand`` did not make are left
    as they are.

    Args:
        model: a model returned by :func:`expand` (then trained).
        inplace: mutate ``model`` instead of a deep copy.

    Returns:
        The contracted model.

    Raises:
        ValueError: when the module ``expand`` left in place of a norm is gone.
    """
    blocks, rests = {}, {}
    for path, m in model.named_modules():
        origin = getattr(m, ORIGIN, None)
        if isinstance(origin, Origin):
            (blocks if isinstance(m, Squeezable) else rests)[id(origin)] = (path, m)
    for key, (path, block) in blocks.items():
        if key not in rests:
            raise ValueError(
                f"contract: {path} ({type(block).__name__}) was made by expand(), but the module "
                "expand() left in place of its BatchNorm is no longer in the model"
            )
    values = composites(list(blocks.values()))  # float64, all checked at once
    replaced: list[tuple[str, nn.Module, nn.Module]] = []  # (path, old, new)
    for (key, (path, block)), (weight, bias) in zip(blocks.items(), values, strict=True):
        rest_path, rest = rests[key]
        origin = getattr(block, ORIGIN)
        conv, norm = _contracted(block, origin, rest, weight, bias, copy_rest=not inplace)
        replaced += [(path, block, conv), (rest_path, rest, norm)]
    if inplace:
        for path, _, new in replaced:
            model.set_submodule(path, new)
        return model
    # a copy in which the replaced modules are never copied: the new ones take their place
    return copy.deepcopy(model, {id(old): new for _, old, new in replaced})


def _contracted(
    block: Squeezable,
    origin: Origin,
    rest: nn.Module,
    weight: Tensor,
    bias: Tensor,
    copy_rest: bool,
) -> tuple[nn.Module, nn.Module]:
    device, dtype = primitives.device_of(block), primitives.dtype_of(block)
    ref = next((m for m in block.modules() if isinstance(m, _BatchNorm)), None)  # main path's
    if ref is None:  # deployed already: unit statistics
        ref = nn.BatchNorm1d(origin.norm.num_features, eps=origin.norm.eps).eval()
    conv = copy.deepcopy(origin.conv).to_empty(device=device).to(dtype)
    norm = copy.deepcopy(origin.norm).to_empty(device=device).to(dtype)
    split_into(weight, bias, ref, conv, norm)
    for name, child in rest.named_children():  # timm's drop / act: the trained modules
        setattr(norm, name, copy.deepcopy(child) if copy_rest else child)
    return conv.train(block.training), norm.train(block.training)


@torch.no_grad()
def split_into(
    weight: Tensor, bias: Tensor, like: _BatchNorm, conv: nn.Module, norm: _BatchNorm
) -> None:
    """Fills ``conv`` (its bias zeroed) and ``norm`` so that ``norm(conv(x))`` equals the
    convolution ``(weight, bias)`` in eval mode, with ``like``'s running variance, eps,
    scale and shift (see :func:`contract`). Computed in float64, cast once."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    var = like.running_var.double()
    eps = like.eps
    scale = like.weight.double() if like.affine else torch.ones_like(var)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    shift = like.bias.double() if like.affine else torch.zeros_like(var)
    if not norm.affine:
        scale, shift = torch.ones_like(var), torch.zeros_like(var)
    std = (var + eps).sqrt()
    conv.weight.copy_(weight.double() * (std / scale).reshape(shape))
    if conv.bias is not None:
        conv.bias.zero_()
    norm.eps = eps
    norm.running_var.copy_(var)
    norm.running_mean.copy_((shift - bias.double()) * std / scale)
    norm.num_batches_tracked.copy_(like.num_batches_tracked)
    if norm.affine:
        norm.weight.copy_(scale)
        norm.bias.copy_(shift)
