"""``repsqueeze.files``: a file is replaced whole or not at all."""

import pytest

from repsqueeze import files


def test_atomic_path_writes_on_success(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(RuntimeError, match="boom"), files.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), files.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
