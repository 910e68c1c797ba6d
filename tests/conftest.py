"""Test configuration: hypothesis profiles, GPU auto-skip, shared fixtures.

Profiles: ``ci`` (default; derandomized so every run sees the same examples), ``random``
(as many examples as ``ci``, fresh ones every run: ``HYPOTHESIS_PROFILE=random pytest``) and
``dev`` (500 random examples). Select one with the ``HYPOTHESIS_PROFILE`` environment
variable or ``pytest --hypothesis-profile NAME``; a failing random example is printed with
its ``@reproduce_failure`` blob.
"""

import os

import pytest
import torch
from helpers import randomize_bn
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("random", settings.get_profile("ci"), derandomize=False)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread: tiny tensors on a busy 2-core CI machine are
    several times faster without the thread pool's synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(name="randomize_bn")
def randomize_bn_fixture():
    """The :func:`helpers.randomize_bn` function, for tests that prefer a fixture."""
    return randomize_bn
