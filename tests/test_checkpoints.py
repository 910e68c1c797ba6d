"""The checkpoint loader (:mod:`repsqueeze.checkpoints`): what it returns, and one line for
every file it refuses, with no pickled code ever run."""

import pytest
import torch
from deploy_support import BAD_FILES, NET_CONFIG, REPVGG, bad_file, write_checkpoint

import repsqueeze as rs
from repsqueeze import export
from repsqueeze.checkpoints import CheckpointError, load_network, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A repvgg digits net in a run folder."""
    run_dir = tmp_path_factory.mktemp("run")
    return write_checkpoint(run_dir / "checkpoints" / "model.ckpt", REPVGG)


@pytest.mark.parametrize(
    ("net_config", "message"),
    [
        (
            {**NET_CONFIG, "num_classes": -1},
            "net_config num_classes=-1: must be a positive integer",
        ),
        ({**NET_CONFIG, "in_channels": 0}, "net_config in_channels=0: must be a positive integer"),
        ({**NET_CONFIG, "num_classes": "ten"}, "net_config num_classes='ten'"),
    ],
)
def test_bad_net_config_names_the_key(tmp_path, net_config, message):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net_config": net_config}}, path)
    with pytest.raises(CheckpointError, match=message):
        load_network(path)


def test_weights_that_do_not_fit_name_keys_and_shapes(checkpoint, tmp_path):
    """A 5-class head stored under a 10-class net_config; a stray key; a missing key."""
    ckpt = torch.load(checkpoint, weights_only=True)
    state = ckpt["state_dict"]
    state["net.head.weight"] = state["net.head.weight"][:5]
    state["net.extra.weight"] = torch.zeros(2)
    del state["net.head.bias"]
    path = tmp_path / "mismatch.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        load_network(path)
    message = str(info.value)
    assert "weights do not fit" in message
    assert "missing head.bias" in message
    assert "unexpected extra.weight" in message
    assert "head.weight (5, 64) vs (10, 64) expected" in message


def test_a_deployed_file_is_not_deployed_again(checkpoint, tmp_path):
    ckpt = read_checkpoint(checkpoint)
    path = tmp_path / "deployed.pt"
    export.save_deployed(rs.deploy(load_network(ckpt)), path, ckpt.net_config)
    with pytest.raises(CheckpointError, match="is already deployed.*load_deployed.*checkpoints/"):
        load_network(path)


def test_a_gpu_checkpoint_loads_on_the_cpu(checkpoint, tmp_path, monkeypatch):
    """A checkpoint whose tensors were saved on ``cuda:0`` (the storage location recorded
    in the file, as train.py on a GPU writes it) is mapped to the CPU."""
    ckpt = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "gpu.ckpt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, path)
    if not torch.cuda.is_available():  # control: the file really says cuda
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    net = load_network(path)
    assert {t.device.type for t in net.state_dict().values()} == {"cpu"}
    x = torch.randn(2, 1, 8, 8)
    reference = load_network(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)


def test_the_marker_is_a_real_probe(tmp_path):
    """Control: unpickling ``CreatesMarker`` with code execution does create the marker."""
    path = bad_file("pickled_object", tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_checkpoint_refuses(tmp_path, kind):
    path = bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError, match=BAD_FILES[kind] or None) as info:
        load_network(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "checkpoint_dict",
    [
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "no_such_net"}}},
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "digits_net", "blok": 1}}},
        {"state_dict": {}, "hyper_parameters": ["not", "a", "dict"]},
        {"state_dict": ["not", "a", "dict"], "hyper_parameters": {"net_config": NET_CONFIG}},
    ],
    ids=["unknown_model", "unknown_argument", "hparams_not_a_dict", "state_dict_not_a_dict"],
)
def test_malformed_checkpoint_is_one_line(tmp_path, checkpoint_dict):
    """A checkpoint whose parts have the wrong types, or whose net_config builds no network:
    one CheckpointError naming the file (not a ValueError/TypeError/AttributeError from
    deep inside, which ``python deploy.py`` would print as a traceback)."""
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint_dict, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_network(path)


def test_refusal_message_is_plain_text(tmp_path):
    """torch's weights-only message carries ANSI bold escapes (``\\x1b[1m``) and is cut after
    "you have two options," without the options: the one-line refusal repeats neither."""
    path = bad_file("pickled_object", tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_network(path)
    assert "\x1b" not in str(info.value)


def test_read_checkpoint_gives_what_deploy_and_resume_need(checkpoint):
    ckpt = read_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert ckpt.path == checkpoint
    assert ckpt.net_config == REPVGG
    assert ckpt.hyper_parameters == saved["hyper_parameters"]
    assert not ckpt.averaged
    assert ckpt.state_dict.keys() == saved["state_dict"].keys()
    assert {f"net.{k}" for k in ckpt.net_state} == set(saved["state_dict"])
    net = load_network(ckpt)
    assert not net.training
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][f"net.{name}"], rtol=0, atol=0)


def test_weight_averaging_is_reported(checkpoint, tmp_path):
    """Lightning's WeightAveraging callback keeps the current weights beside the averaged
    ones (which it saves as state_dict): the checkpoint says so."""
    saved = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "ema.ckpt"
    torch.save({**saved, "current_model_state": saved["state_dict"], "averaging_state": {}}, path)
    assert read_checkpoint(path).averaged


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_cut_checkpoint_is_one_line(checkpoint, tmp_path, keep):
    """A copy cut short (a full disk, an interrupted transfer): one line naming the file."""
    data = checkpoint.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="is the file complete") as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: not a readable PyTorch checkpoint")
    assert "\n" not in str(info.value)
