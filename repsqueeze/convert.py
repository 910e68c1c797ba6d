"""Whole-model conversions: deploy every re-parameterizable block of any ``nn.Module``."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze import primitives
from repsqueeze.blocks import Squeezable, SqueezableBlock

# Method names other libraries use for "switch this block to its deployed form":
# timm/MobileOne ``reparameterize``, RepVGG/DBB/ACNet ``switch_to_deploy``, YOLO-style ``fuse``.
FOREIGN_HOOKS = ("reparameterize", "switch_to_deploy", "fuse")


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False, unwrap: bool = False) -> nn.Module:
    """Collapses every squeezable block of ``model`` into one convolution.

    Our blocks are deployed with :meth:`Squeezable.deploy`; blocks of other libraries that
    follow the common conventions (a ``reparameterize()``, ``switch_to_deploy()`` or
    ``fuse()`` method) are deployed by calling that method. Idempotent.

    Args:
        model: any module.
        inplace: mutate ``model``; by default a deep copy is deployed and ``model`` is
            left untouched.
        unwrap: replace each deployed block of ours by its bare ``nn.ConvNd``, so the model
            holds only torch modules (no repsqueeze import needed to load its ``state_dict``:
            keys lose the block's ``.conv``), and no block's ``forward`` runs per call.

    Returns:
        The deployed model (``model`` itself when ``inplace``; with ``unwrap``, the bare
        convolution when ``model`` is itself a block).
    """
    if not inplace:
        model = copy.deepcopy(model)
    _deploy_tree(model)
    return _unwrap(model) if unwrap else model


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, Squeezable):
        return module.conv
    for name, child in list(module.named_children()):
        bare = _unwrap(child)
        if bare is not child:
            setattr(module, name, bare)
    return module


def _deploy_tree(module: nn.Module) -> None:
    if isinstance(module, Squeezable):
        module.deploy()
        return
    for hook in FOREIGN_HOOKS:
        method = getattr(module, hook, None)
        if callable(method):
            method()
            break
    for child in list(module.children()):
        _deploy_tree(child)


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Sets ``mode`` (``"chain"``, ``"online"`` or ``"auto"``) on every top-level block.

    Args:
        model: any module.
        mode: see :meth:`repsqueeze.blocks.Squeezable.set_mode`.

    Returns:
        ``model``, changed in place.
    """
    from repsqueeze.blocks import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, Squeezable):
        model.set_mode(mode)
        return model
    for child in model.children():
        set_mode(child, mode)
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
    BatchNorm after it became ``Identity``); ``skipped`` lists ``(path, reason)``."""

    expanded: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
    ``block``, initialised so that the function is unchanged (in eval and in training
    mode): the block's main path carries the old weights and statistics, every extra branch
    ends in a BatchNorm with zero scale and shift (ExpandNets chains start as an exact
    embedding of the old kernel). ``deploy(expand(model))`` has the layer shapes of
    ``model``.

    Eligible: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding whose
    output feeds only a ``BatchNorm`` (found by tracing with ``torch.fx``; inside an
    ``nn.Sequential`` when the model cannot be traced). Everything else stays as it is and
    is listed in the report, with the reason.

    Args:
        model: any module, e.g. a torchvision ResNet with pretrained weights loaded.
        block: a kind of :func:`repsqueeze.zoo.make_block` (``repvgg``, ``acb``, ``dbb``,
            ``mobileone``, ``expand_ck``, ``expand_cl``, ``plain``).
        inplace: mutate ``model`` instead of a deep copy.
        return_report: also return an :class:`ExpandReport`.
        **block_kwargs: further arguments of the blocks (``expansion``, ...).
    """
    from repsqueeze.zoo import BLOCKS, make_block

    if block not in BLOCKS:
        raise ValueError(f"unknown block kind {block!r}; valid kinds: {', '.join(BLOCKS)}")
    if block_kwargs.get("online_norm"):
        raise ValueError(
            "expand: online_norm=True blocks have no BatchNorm to take over the old one"
        )
    if not inplace:
        model = copy.deepcopy(model)
    report = ExpandReport()
    for conv_path, bn_path in _conv_bn_pairs(model, report):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        reason = _ineligible(conv, bn, block)
        if reason:
            report.skipped.append((conv_path, reason))
            continue
        dims = conv.weight.dim() - 2
        new = make_block(
            block, conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
            conv.groups, dims, padding_mode=conv.padding_mode, **block_kwargs,
        )  # fmt: skip
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        _init_like(new, conv, bn)
        new.train(conv.training)
        model.set_submodule(conv_path, new)
        model.set_submodule(bn_path, nn.Identity())
        report.expanded[conv_path] = block
    return (model, report) if return_report else model


def _conv_bn_pairs(model: nn.Module, report: ExpandReport) -> list[tuple[str, str]]:
    """``(conv path, bn path)`` where the conv's output goes only into that BatchNorm."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
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


def _ineligible(conv: nn.Module, bn: nn.Module, block: str) -> str | None:
    k, dims = conv.kernel_size, len(conv.kernel_size)
    if len(set(k)) != 1 or k[0] % 2 == 0:
        return f"kernel {tuple(k)} is not square and odd"
    if set(conv.dilation) != {1}:
        return f"dilation {conv.dilation} (blocks are built with dilation 1)"
    if len(set(conv.stride)) != 1:
        return f"stride {conv.stride} differs between axes"
    if primitives.conv_padding(conv) != ((k[0] // 2, k[0] // 2),) * dims:
        return f"padding {conv.padding} is not centred (k // 2)"
    if bn.num_features != conv.out_channels or bn.running_mean is None:
        return "the BatchNorm after it has other channels or no running statistics"
    if block.startswith("expand") and conv.groups != 1:
        return "ExpandNets blocks start from an exact embedding only for groups=1"
    if block == "expand_ck":
        hidden, need = 4 * conv.out_channels, conv.in_channels * (k[0] - 2) ** dims
        if k[0] >= 5 and hidden < need:
            return f"expand_ck needs >= {need} hidden channels for an exact start, has {hidden}"
    if block == "dbb" and conv.padding_mode != "zeros":
        return "DiverseBranchBlock pads with zeros only"
    return None


def _init_like(block: Squeezable, conv: nn.Module, bn: _BatchNorm) -> None:
    """Sets ``block`` so that it computes ``bn(conv(x))``."""
    from repsqueeze.zoo import ExpandedConv

    if isinstance(block, ExpandedConv):
        *convs, norm = block.layers
        _embed_chain(list(convs), conv.weight)
    else:
        main, *others = block.branches if hasattr(block, "branches") else [block.layers]
        main_conv, norm = [
            m for m in main.modules() if isinstance(m, (*primitives.CONVS, _BatchNorm))
        ]
        main_conv.weight.copy_(conv.weight)
        for branch in others:
            last = [m for m in branch.modules() if isinstance(m, _BatchNorm)][-1]
            last.weight.zero_()
            last.bias.zero_()
    norm.load_state_dict(bn.state_dict())
    if conv.bias is not None:  # bn(conv(x) + b) == bn'(conv(x)) with the mean shifted by b
        norm.running_mean.sub_(conv.bias)


def _embed_chain(convs: list[nn.Module], weight: Tensor) -> None:
    """Weights for a chain of bias-free convs that composes exactly to ``weight``.

    1x1 layers pass channels through (identity on the first channels); 3x3 layers before
    the last spatial one build shifted copies of the input, the last spatial one mixes
    them with ``weight``'s taps.
    """
    c_out, c_in, *k = weight.shape
    spatial = [i for i, c in enumerate(convs) if c.kernel_size[0] > 1]
    # the mixing layer: the last spatial one, else the middle of a 1x1 chain, so that the
    # identity layers around it are at least as wide as what they pass through
    mix = spatial[-1] if spatial else (len(convs) - 1) // 2
    shifts = [(0,) * len(k)]  # offsets carried by the channel groups after each layer
    for i, c in enumerate(convs):
        c.weight.zero_()
        if c.bias is not None:
            c.bias.zero_()
        if i == mix:
            _mix(c.weight, weight, shifts)
            shifts = None
        elif c.kernel_size[0] == 1:
            n = c_in * len(shifts) if shifts is not None else c_out
            idx = torch.arange(n)
            c.weight[(idx, idx, *([0] * len(k)))] = 1
        else:
            shifts = _shift(c.weight, c_in, shifts)


def _shift(w: Tensor, c_in: int, shifts: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A 3x3 layer turning channel groups at ``shifts`` into groups at every offset + tap."""
    extent = max(s[0] for s in shifts) + 2
    new = list(itertools.product(range(extent + 1), repeat=len(shifts[0])))
    for j, q in enumerate(new):
        u = tuple(min(v, 2) for v in q)
        p = tuple(v - t for v, t in zip(q, u, strict=True))
        src = shifts.index(p)
        for c in range(c_in):
            w[(j * c_in + c, src * c_in + c, *u)] = 1
    return new


def _mix(w: Tensor, weight: Tensor, shifts: list[tuple[int, ...]]) -> None:
    """The layer that sums ``weight``'s taps from channel groups at ``shifts``."""
    c_out, c_in, *k = weight.shape
    kw = w.shape[2]
    if shifts == [(0,) * len(k)] and kw == k[0]:
        w[:c_out, :c_in] = weight
        return
    for q in itertools.product(range(k[0]), repeat=len(k)):
        u = tuple(min(v, kw - 1) for v in q)
        src = shifts.index(tuple(v - t for v, t in zip(q, u, strict=True)))
        w[(slice(0, c_out), slice(src * c_in, (src + 1) * c_in), *u)] = weight[
            (slice(None), slice(None), *q)
        ]
