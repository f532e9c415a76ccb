"""What scripts/databricks_submit.py stages: a committed symlink is staged as the file it points to,
so one that leads outside the repository is refused, naming it."""

from __future__ import annotations

import pytest

from scripts.databricks_submit import check_tracked


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "repo"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (tmp_path / "netrc").write_text("machine example.com password hunter2")
    (root / "inside").symlink_to("a.txt")
    (root / "sub" / "up").symlink_to("../a.txt")
    return root


def test_links_inside_the_repository_are_kept_and_deleted_files_dropped(root):
    assert check_tracked(root, ["a.txt", "inside", "sub/up", "gone.txt"]) == ["a.txt", "inside", "sub/up"]


@pytest.mark.parametrize("target", ["ABSOLUTE", "../../netrc", "../sub/../../netrc", "CHAIN"])
def test_a_committed_symlink_leading_outside_is_refused_naming_it(root, target):
    link = root / "sub" / "creds.txt"
    if target == "ABSOLUTE":
        link.symlink_to(root.parent / "netrc")
    elif target == "CHAIN":  # inside at first sight, through a second link that leaves
        (root / "hop").symlink_to(root.parent / "netrc")
        link.symlink_to("../hop")
    else:
        link.symlink_to(target)
    with pytest.raises(ValueError) as e:
        check_tracked(root, ["a.txt", "sub/creds.txt"])
    assert str(e.value).startswith("sub/creds.txt: a committed symlink that leads outside the repository")
    assert "\n" not in str(e.value)


def test_a_dangling_link_outside_is_refused_too(root):
    (root / "gone").symlink_to(root.parent / "no-such-file")
    with pytest.raises(ValueError, match="gone: a committed symlink that leads outside"):
        check_tracked(root, ["gone"])
