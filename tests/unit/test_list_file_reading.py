"""The list file is read as root from a directory billing's own user may write: what that user
could plant there (a symlink to a root-only file, a FIFO, an endless device) is refused, never
followed, waited on or read without end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enforcer import sources
from enforcer.sources import read_list_file
from enforcer.subscribers import ListError

LIST = "subscribers:\n  - {id: C-1, addresses: [100.64.0.10]}\n"


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text(LIST)
    assert [s.id for s in read_list_file(str(tmp_path / "list.yaml")).subscribers] == ["C-1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a symlink owned by another user needs root")
def test_a_symlink_another_user_made_is_refused_and_roots_own_is_followed(tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_text(LIST)
    secret.chmod(0o600)
    link = tmp_path / "list.yaml"
    link.symlink_to(secret)
    assert [s.id for s in read_list_file(str(link)).subscribers] == ["C-1"], "root's own symlink: followed"
    os.lchown(link, 65534, 65534)
    with pytest.raises(ListError, match="a symlink owned by uid 65534, not root: refused"):
        read_list_file(str(link))


def _swapped_after_lstat(monkeypatch: pytest.MonkeyPatch, path: Path, target: Path) -> None:
    """The race billing's account can run: the checked file replaced by a symlink to ``target``
    right after the daemon's ``lstat`` (security audit: 6 reads of a root-only file in 6 s)."""
    real = os.lstat
    done = []

    def lstat_then_swap(p: object) -> os.stat_result:
        result = real(p)   # type: ignore[arg-type]
        if not done and str(p) == str(path):
            done.append(True)
            swap = path.with_name("swap")
            swap.symlink_to(target)
            os.replace(swap, path)
        return result

    monkeypatch.setattr(sources.os, "lstat", lstat_then_swap)


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "root-only"
    secret.write_text(LIST)
    secret.chmod(0o600)
    path = tmp_path / "list.yaml"
    path.write_text("subscribers: []\n")
    _swapped_after_lstat(monkeypatch, path, secret)
    with pytest.raises(ListError, match="replaced by a symlink while being opened: refused"):
        read_list_file(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="a symlink owned by root needs root")
def test_roots_symlink_swapped_for_another_after_the_check_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "good").write_text(LIST)
    secret = tmp_path / "root-only"
    secret.write_text(LIST)
    secret.chmod(0o600)
    path = tmp_path / "list.yaml"
    path.symlink_to(tmp_path / "good")
    _swapped_after_lstat(monkeypatch, path, secret)
    with pytest.raises(ListError, match="a symlink changed while being followed: refused"):
        read_list_file(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a symlink owned by another user needs root")
def test_roots_symlink_into_the_drop_directory_does_not_follow_billings_own_link(tmp_path: Path) -> None:
    """Root's link (in /etc, say) names the list in billing's drop directory, where billing put a
    link of its own to a root-only file: refused at that hop, whatever root's link says (review)."""
    secret = tmp_path / "root-only"
    secret.write_text(LIST)
    secret.chmod(0o600)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "list.yaml").symlink_to(secret)
    os.lchown(drop / "list.yaml", 65534, 65534)
    configured = tmp_path / "list.yaml"
    configured.symlink_to(drop / "list.yaml")
    with pytest.raises(ListError, match=r"a symlink it leads to, owned by uid 65534, not root: refused"):
        read_list_file(str(configured))
    (drop / "list.yaml").unlink()
    (drop / "list.yaml").write_text(LIST)
    assert [s.id for s in read_list_file(str(configured)).subscribers] == ["C-1"], "root's link to billing's file"


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "list.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ListError, match="not a regular file"):
        read_list_file(str(fifo))


def test_a_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ListError, match="not a regular file"):
        read_list_file("/dev/zero")


def test_a_file_larger_than_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_BODY", 64)
    (tmp_path / "list.yaml").write_text(LIST + "#" * 100 + "\n")
    with pytest.raises(ListError, match="larger than"):
        read_list_file(str(tmp_path / "list.yaml"))


async def test_a_list_renamed_into_place_while_the_one_in_force_is_read_is_read_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint recorded for an unchanged list is the one of the file read, never a second
    ``stat``: billing's new list, renamed into place between the read and that stat, would be
    taken as read and never parsed (found in review)."""
    path = tmp_path / "list.yaml"
    path.write_text(LIST)
    in_force = sources.content_digest(LIST.encode(), str(path), None)
    lists: list[object] = []

    async def on_list(update: object) -> None:
        lists.append(update)

    async def on_failure(failure: object) -> None:
        raise AssertionError(failure)

    source = sources.FileSource(str(path), on_list, on_failure, applied=lambda: in_force)
    real = sources._read_regular_file

    def read_then_replace(name: str) -> tuple[bytes, os.stat_result]:
        read = real(name)
        (tmp_path / "new.yaml").write_text(LIST.replace("100.64.0.10", "100.64.0.11"))
        os.replace(tmp_path / "new.yaml", path)          # billing's atomic rename, just after the read
        return read

    monkeypatch.setattr(sources, "_read_regular_file", read_then_replace)
    await source.check()
    assert lists == [], "the list in force was not parsed again"
    assert source.applied != sources._fingerprint_or_none(str(path)), "the new list counts as not read yet"
