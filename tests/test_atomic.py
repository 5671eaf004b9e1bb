import pytest

from quantlab.atomic import atomic_directory


def test_completed_block_renames_into_place(tmp_path):
    final = tmp_path / "artifact"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("hello")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "hello"
    assert list(tmp_path.iterdir()) == [final]


def test_failed_block_leaves_nothing(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_result_is_kept(tmp_path):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "a.txt").write_text("first")
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "first"
    assert list(tmp_path.iterdir()) == [final]
