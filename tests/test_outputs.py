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


def _store(path, tag: str):
    (path / "c").mkdir(parents=True)
    (path / "zarr.json").write_text(tag)
    for i in range(3):
        (path / "c" / str(i)).write_text(f"{tag}{i}")
    return path


def test_a_store_replaced_is_whole_at_its_path_even_when_the_deletion_is_killed(tmp_path, monkeypatch):
    """The old store is renamed aside before the new one takes its place: a kill while it is being
    deleted leaves the new store whole at the path (a store that lost its zarr.json first would be
    refused by every later run as "not a Zarr store"); the next call clears what was left aside."""
    import shutil

    import wsi_espnet.outputs as outputs

    dst = _store(tmp_path / "p.zarr", "old")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # as a kill while the old store is being deleted

    monkeypatch.setattr(outputs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.replace_folder(_store(tmp_path / "new", "new"), dst)
    assert (dst / "zarr.json").read_text() == "new" and (dst / "c" / "2").read_text() == "new2"
    left = [p.name for p in tmp_path.iterdir() if p.name == ".p.zarr.deleting"]
    assert len(left) == 1  # hidden: an archive's walk and a user's listing pass it by
    monkeypatch.setattr(outputs.shutil, "rmtree", real_rmtree)
    outputs.replace_folder(_store(tmp_path / "newer", "newer"), dst)
    assert (dst / "zarr.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_a_work_folder_is_gone_at_once_from_its_name_when_discarded(tmp_path, monkeypatch):
    import wsi_espnet.outputs as outputs

    work = _store(tmp_path / "mask.tif.work", "w")
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        outputs.discard_folder(work)
    assert not work.exists()  # never a folder without its progress file under the work folder's name
    monkeypatch.undo()
    outputs.remove_aside(work)  # what the next run on that output does first
    assert list(tmp_path.iterdir()) == []
