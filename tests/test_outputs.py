"""The one way results are written (``outputs.atomic_file``): all or nothing at the final path, and
readable by the lab's other users."""

import os

import pytest

from wsi_espnet.outputs import atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_replaces_the_target_only_when_the_block_finishes(tmp_path, umask_022):
    target = tmp_path / "report.json"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.exists()
        assert not target.exists()  # nothing at the final name while it is being written
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "mask.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target, suffix=".png") as tmp:
        assert tmp.suffix == ".png"  # writers that pick a format by extension see the right one
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_two_writers_of_one_path_never_share_a_temporary(tmp_path):
    target = tmp_path / "x.json"
    with atomic_file(target) as a, atomic_file(target) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer block finished last
