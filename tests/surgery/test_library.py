"""The library's contract for unusual inputs (docs/library.md): shared blocks, wrappers,
training mode, foreign re-parameterizable blocks, hooks and parametrizations, unbatched
input, scripting, damaged files and model arguments. Each case is answered exactly or
refused with one line that names what is wrong."""

from __future__ import annotations

import copy
import io
import warnings
import weakref
import zipfile

import pytest
import torch
import torch.distributed as dist
from helpers import naive, randomize
from torch import nn
from torch.nn.utils import parametrizations, prune

import repsqueeze as rs

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning"),
]


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- shared blocks -----------------------------------------------------------------------------
def test_deploy_keeps_a_block_used_twice_shared_and_unwraps_every_use(generator):
    block = randomize(rs.RepVGGBlock(4, 4), generator)
    model = nn.Sequential(block, nn.ReLU(), block).eval()
    x = torch.randn(2, 4, 6, 6, generator=generator)
    with torch.no_grad():
        expected = model(x)
        for unwrap in (False, True):
            out = rs.deploy(model, unwrap=unwrap)
            assert out[0] is out[2]
            assert type(out[2]) is (nn.Conv2d if unwrap else rs.RepVGGBlock)
            _assert_close(out(x), expected)


def test_deploy_replaces_every_use_of_a_shared_foreign_block():
    class Fusable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x)

        def fuse(self):  # timm's convention: the returned module takes the block's place
            return self.conv

    shared = Fusable()
    out = rs.deploy(nn.Sequential(shared, nn.ReLU(), shared).eval())
    assert type(out[0]) is nn.Conv2d and out[0] is out[2]


# --- wrappers and training mode ----------------------------------------------------------------
def _gloo_group(tmp_path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )


def test_deploy_takes_off_ddp_dataparallel_and_compile_wrappers(generator, tmp_path):
    model = randomize(nn.Sequential(rs.RepVGGBlock(3, 3), nn.ReLU()), generator).eval()
    x = torch.randn(1, 3, 6, 6, generator=generator)
    with torch.no_grad():
        expected = model(x)
    _gloo_group(tmp_path)
    try:
        wrappers = [
            nn.parallel.DistributedDataParallel(model),
            nn.DataParallel(model),
            torch.compile(model),
            torch.compile(nn.parallel.DistributedDataParallel(model)),
        ]
        for wrapper in wrappers:
            out = rs.deploy(wrapper)
            assert type(out) is nn.Sequential and out[0].deployed
            with torch.no_grad():
                _assert_close(out(x), expected)
        assert not model[0].deployed  # a copy was deployed
    finally:
        dist.destroy_process_group()


def test_deploy_warns_once_on_training_mode_and_keeps_the_modes(generator):
    model = randomize(nn.Sequential(rs.RepVGGBlock(3, 3), nn.Dropout(0.5)), generator).train()
    with pytest.warns(UserWarning, match=r"training mode.*call model.eval\(\) first") as record:
        out = rs.deploy(model)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert out.training and out[0].training and out[0].conv.training  # modes kept
    x = torch.randn(2, 3, 6, 6, generator=generator)
    with torch.no_grad():  # folded with the running statistics: the eval-mode function
        _assert_close(out.eval()(x), model.eval()(x))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        rs.deploy(model)  # eval mode: no warning
        rs.deploy(rs.deploy(model).train())  # nothing left to fold: no warning


# --- expand and foreign re-parameterizable blocks ----------------------------------------------
class _ForeignRepBlock(nn.Module):
    """A block of another library: its reparameterize() reads the conv it built."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))

    def reparameterize(self):
        self.weight = self.conv.weight * 1.0  # fails when the conv is no conv any more


def test_expand_leaves_convs_inside_foreign_reparameterizable_blocks():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), _ForeignRepBlock()
    )
    with pytest.warns(UserWarning, match=r"1 conv\(s\).*2 \(_ForeignRepBlock\).*from_timm"):
        out, report = rs.expand(model, return_report=True)
    assert list(report.expanded) == ["0"]
    assert dict(report.skipped)["2.conv"].startswith("inside 2 (_ForeignRepBlock), which")
    assert type(out[2].conv) is nn.Conv2d
    rs.deploy(out.eval())  # the foreign block's own hook still runs


def test_expand_inside_timm_repvgg_blocks_points_to_from_timm_and_stays_deployable(generator):
    pytest.importorskip("timm")
    from timm.models.byobnet import RepVggBlock
    from timm.utils.model import reparameterize_model

    model = randomize(nn.Sequential(RepVggBlock(3, 4), RepVggBlock(4, 4)), generator).eval()
    with pytest.warns(UserWarning, match=r"4 conv\(s\) inside 2 module\(s\).*rs.from_timm"):
        out, report = rs.expand(model, return_report=True)
    assert not report.expanded and all("from_timm" in why for _, why in report.skipped)
    x = torch.randn(1, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)
        _assert_close(rs.deploy(out)(x), expected)
        _assert_close(reparameterize_model(out)(x), expected)


# --- hooks and parametrizations on layers inside a block ---------------------------------------
def _chain() -> rs.SqueezableBlock:
    return rs.SqueezableBlock(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_a_hook_on_an_inner_layer_is_refused_at_forward(kind):
    block = rs.RepVGGBlock(3, 3)
    conv = block.branches[0][0]
    getattr(conv, f"register_{kind}_hook")(lambda *args: None)
    with pytest.raises(ValueError, match=r"RepVGGBlock: branches\.0\.0 \(Conv2d\) has a ") as err:
        block(torch.randn(2, 3, 5, 5))
    assert "register it on the block itself" in _one_line(err)
    if kind == "full_backward":  # nothing to lose at deploy: the values do not depend on it
        assert rs.deploy(block.eval()).deployed
    else:
        with pytest.raises(ValueError, match=r"branches\.0\.0 \(Conv2d\) has a forward"):
            rs.deploy(block)


def test_hooks_on_the_block_itself_run(generator):
    block = randomize(rs.RepVGGBlock(3, 3), generator)
    seen = []
    block.register_forward_hook(lambda m, inp, out: seen.append(out.shape))
    block(torch.randn(2, 3, 5, 5, generator=generator))
    assert seen == [torch.Size([2, 3, 5, 5])]


@pytest.mark.parametrize(
    "apply, fix",
    [
        (torch.nn.utils.spectral_norm, "parametrizations.spectral_norm"),
        (torch.nn.utils.weight_norm, "parametrizations.weight_norm"),
        (
            lambda conv: prune.l1_unstructured(conv, "weight", 0.5),
            r"prune.remove\(layer, 'weight'\)",
        ),
    ],
)
def test_weight_recomputing_pre_hooks_are_refused_at_build_forward_and_deploy(apply, fix):
    with pytest.raises(ValueError, match=rf"SqueezableBlock: layers\.0 \(Conv2d\) .*{fix}"):
        rs.SqueezableBlock(apply(nn.Conv2d(3, 4, 3, padding=1)), nn.BatchNorm2d(4))
    block = _chain().eval()
    apply(block.layers[0])  # after the block was built
    for run in (lambda: block(torch.randn(2, 3, 5, 5)), lambda: rs.deploy(block)):
        with pytest.raises(ValueError, match=fix) as err:
            run()
        _one_line(err)


@pytest.mark.parametrize("mode", ["chain", "online"])
@pytest.mark.parametrize(
    "apply", [parametrizations.weight_norm, parametrizations.spectral_norm], ids=["wn", "sn"]
)
def test_parametrized_layers_train_like_their_naive_twin_and_deploy_exactly(mode, apply):
    torch.manual_seed(0)
    block = rs.SqueezableBlock(
        apply(nn.Conv2d(3, 4, 3, padding=1)), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()  # eval: online mode folds the BatchNorm; parametrizations still train
    block.set_mode(mode)
    twin = copy.deepcopy(block)
    x = torch.randn(2, 3, 6, 6)
    opt_b = torch.optim.SGD(block.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        for opt, forward in ((opt_b, block), (opt_t, lambda v: naive(twin, v))):
            opt.zero_grad()
            forward(x).square().mean().backward()
            opt.step()
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    with torch.no_grad():
        expected = naive(twin, x)
        _assert_close(block(x)[interior], expected[interior])
        _assert_close(rs.deploy(block)(x), block(x))


# --- unbatched input ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["chain", "online", "auto"])
@pytest.mark.parametrize("training", [False, True])
def test_unbatched_input_is_accepted_in_every_mode(mode, training, generator):
    block = randomize(rs.make_block("dbb", 3, 4, mode=mode), generator).train(training)
    if training and mode == "online":
        block.set_mode("chain")  # online mode cannot fold batch statistics
    x = torch.randn(3, 6, 6, generator=generator)
    with torch.no_grad():
        y = block(x)
        assert y.shape == (4, 6, 6)
        _assert_close(y, block(x.unsqueeze(0))[0])
        if not training:
            _assert_close(rs.deploy(block)(x), y)


def test_unbatched_1d_input_and_wrong_ranks():
    block = rs.SqueezableBlock(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3)).eval()
    assert block(torch.randn(2, 7)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"1-D block takes .* got shape \(1, 1, 2, 7\)") as err:
        block(torch.randn(1, 1, 2, 7))
    _one_line(err)


# --- scripting ---------------------------------------------------------------------------------
def test_a_deployed_block_scripts_and_a_training_one_points_to_deploy(generator):
    model = randomize(
        nn.Sequential(rs.RepVGGBlock(3, 4), nn.ReLU(), rs.make_block("dbb", 4, 4)), generator
    ).eval()
    x = torch.randn(2, 3, 6, 6, generator=generator)
    with torch.no_grad():
        for deployed in (rs.deploy(model), rs.deploy(model, unwrap=True)):
            _assert_close(torch.jit.script(deployed)(x), model(x))
    with pytest.raises(TypeError, match=r"RepVGGBlock is in training form.*unwrap=True") as err:
        torch.jit.script(model)
    _one_line(err)


# --- whole-module pickles after unwrap ---------------------------------------------------------
def test_unwrapped_expanded_model_pickles_without_repsqueeze(generator):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
    )  # fmt: skip
    out = rs.deploy(rs.expand(randomize(model, generator).eval()), unwrap=True)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"repsqueeze" not in pickled
    x = torch.randn(1, 3, 6, 6, generator=generator)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        _assert_close(loaded(x), model(x))


# --- load_deployed on damaged files ------------------------------------------------------------
@pytest.fixture(scope="module")
def deployed_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("deployed") / "deployed.pt"
    rs.save_deployed(rs.deploy(rs.create_model("digits_net").eval()), path, {"name": "digits_net"})
    return path.read_bytes()


class _NotPlainData:
    pass


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda b: b[: len(b) // 2], "not a complete deployed model file"),
        (lambda b: b"", "not a complete deployed model file"),
        (lambda b: b[:-300] + bytes([b[-300] ^ 0xFF]) + b[-299:], "damaged|not a complete"),
        (lambda b: b[:40_000] + bytes([b[40_000] ^ 0xFF]) + b[40_001:], "damaged: entry data/"),
        (None, r"refused: .*\(it references test_library._NotPlainData\); nothing in it was run"),
    ],
    ids=["truncated", "empty", "tail-byte", "data-byte", "foreign-object"],
)
def test_load_deployed_names_a_damaged_file(damage, problem, deployed_bytes, tmp_path):
    path = tmp_path / "deployed.pt"
    if damage is None:
        torch.save({"format": _NotPlainData()}, path)
    else:
        path.write_bytes(damage(deployed_bytes))
    with pytest.raises(ValueError, match=problem) as err:
        rs.load_deployed(path)
    assert _one_line(err).startswith(f"{path}: ")


# --- create_model arguments --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": -3},
        {"in_channels": 0},
        {"num_classes": 2.5},
        {"in_channels": True},
    ],  # fmt: skip
)
def test_create_model_refuses_non_positive_counts(kwargs):
    ((arg, value),) = kwargs.items()
    with pytest.raises(
        ValueError, match=rf"^digits_net: {arg} must be a positive integer, got {value!r}$"
    ):
        rs.create_model("digits_net", **kwargs)


@pytest.mark.parametrize("arg", ["in_channels", "out_channels"])
@pytest.mark.parametrize("value", [0, -1])
def test_make_block_refuses_non_positive_channels(arg, value):
    kwargs = {"in_channels": 3, "out_channels": 3, arg: value}
    with pytest.raises(ValueError, match=rf"^make_block: {arg} must be a positive integer"):
        rs.make_block("repvgg", **kwargs)


# --- entry checks of deploy / expand / load_deployed -------------------------------------------
@pytest.mark.parametrize("convert", [rs.deploy, rs.expand])
def test_deploy_and_expand_refuse_what_is_not_a_module(convert):
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got NoneType$"):
        convert(None)


def test_expand_refuses_a_wrapped_model():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"wrapped in DataParallel; expand the module inside"):
        rs.expand(nn.DataParallel(model))


def test_load_deployed_names_a_bad_map_location(deployed_bytes, tmp_path):
    path = tmp_path / "deployed.pt"
    path.write_bytes(deployed_bytes)
    assert isinstance(rs.load_deployed(path), nn.Module)  # the intact file loads
    with pytest.raises(ValueError, match=r"^load_deployed: map_location='gpu7': "):
        rs.load_deployed(path, map_location="gpu7")


def test_deploy_frees_the_training_branches():
    block = rs.RepVGGBlock(3, 3)
    layer = weakref.ref(block.branches[0][0])
    block.deploy()
    assert layer() is None  # no reference cycle: freed at once
