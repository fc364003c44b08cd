"""Atomic writes: complete files with ordinary permissions, or nothing."""
import os

import pytest

from nnunet_kaz.io_utils import atomic_dir, atomic_path


def test_atomic_path_gives_plain_permissions_and_leaves_nothing_on_error(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.txt") as tmp:
                tmp.write_text("half")
                raise RuntimeError
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
