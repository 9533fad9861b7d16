"""restore.discard: the removal of replaced copies, on a real filesystem: everything
below the path goes, nothing a link points to does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from homesafe import restore
from tests.conftest import requires_root


def test_discard_removes_a_whole_tree_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "kept").mkdir(parents=True)
    (outside / "kept/file").write_text("must survive\n")
    tree = tmp_path / "tree"
    for directory in range(3 * restore.DISCARD_THREADS):
        (tree / f"d{directory}/sub").mkdir(parents=True)
        for number in range(20):
            (tree / f"d{directory}/f{number}").write_bytes(b"x" * number)
        (tree / f"d{directory}/sub/deep").write_text("deep\n")
    (tree / "link-to-directory").symlink_to(outside / "kept")
    (tree / "link-to-file").symlink_to(outside / "kept/file")
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tree / "fifo")
    (tree / "d0/empty").mkdir()

    restore.discard(tree)

    assert not os.path.lexists(tree)
    assert (outside / "kept/file").read_text() == "must survive\n"


def test_discard_removes_a_file_or_a_link_itself(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target/file").write_text("kept\n")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "file").write_text("gone\n")

    restore.discard(tmp_path / "link")
    restore.discard(tmp_path / "file")
    restore.discard(tmp_path / "missing")

    assert not os.path.lexists(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "file")
    assert (tmp_path / "target/file").read_text() == "kept\n"


@requires_root()
@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr (e2fsprogs) is missing")
def test_discard_leaves_what_it_cannot_remove_and_raises_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "stuck").mkdir(parents=True)
    (tree / "gone").mkdir()
    (tree / "stuck/immutable").write_text("cannot be unlinked\n")
    (tree / "stuck/other").write_text("x\n")
    (tree / "gone/file").write_text("y\n")
    subprocess.run(["chattr", "+i", str(tree / "stuck/immutable")], check=True)
    try:
        restore.discard(tree)

        remaining = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
        assert remaining == ["stuck", "stuck/immutable"]
    finally:
        subprocess.run(["chattr", "-i", str(tree / "stuck/immutable")], check=True)


def test_holds_few_entries_counts_every_entry_below_and_stops_past_the_limit(
    tmp_path: Path,
) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    for number in range(3):
        (tmp_path / "a/b" / f"f{number}").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a")  # counted, not followed

    # a, a/b, three files, link: 6 entries
    assert restore.holds_few_entries(tmp_path, limit=6)
    assert not restore.holds_few_entries(tmp_path, limit=5)
    assert restore.holds_few_entries(tmp_path / "a/b", limit=3)
    assert not restore.holds_few_entries(tmp_path / "missing")
