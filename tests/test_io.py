"""segicl.io.atomic_directory: all or nothing, the old folder survives a failed save."""

from __future__ import annotations

import pytest

from segicl.io import atomic_directory


def test_atomic_directory_swaps_in_on_success_and_keeps_the_old_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing visible before the block ends
    assert (target / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "one"  # untouched

    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left
