"""Files and folders the stages write, replaced atomically: a reader never sees half of one, and
a failed or interrupted stage leaves the previous outputs whole (nothing mixed, nothing lost)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dfcvae.config import UserError


class DiskFullError(UserError, OSError):
    """Not enough space for a stage's outputs: which disk, how much is free and about how much is needed."""


def write_json(data: Any, path: Path) -> None:
    """`data` as indented JSON with sorted keys at `path` (parents made), via a temporary file and
    os.replace: an interrupted write leaves the old file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


PLAN = ".dfcvae-plan"  # in a staging folder that can be resumed: the digest of the work it holds
MARK = ".dfcvae-output"  # in every folder a stage replaces whole: the folder is the project's


def staging_dir(target: Path, names: tuple[str, ...], resume: str | None = None) -> Path:
    """A fresh, empty folder beside `target` (same file system, so it can be renamed into place) in
    which a stage writes `target`'s new contents: `<name>.partial`. A failed or interrupted earlier
    attempt's folder is cleared first; an earlier swap cut short between its renames is undone.
    UserError when `target` holds files but neither MARK nor any of `names`, the files this stage
    writes there (DVC may have removed the ones it tracks): the folder is someone else's, and
    replacing it would delete their files.

    resume: a digest of the work planned; an earlier attempt's folder made with the same digest
    is kept as it is (its finished parts are reused), any other is cleared."""
    target = Path(target)
    recover_swap(target)
    if target.is_dir() and not any((target / name).exists() for name in (MARK, *names)):
        foreign = next(target.iterdir(), None)
        if foreign is not None:
            raise UserError(
                f"{target} holds files this project did not write (such as {foreign.name}), and the stage "
                "replaces the whole folder: point the setting at a folder of its own, or empty this one."
            )
    staging = target.with_name(target.name + ".partial")
    if resume is not None and (staging / PLAN).is_file() and (staging / PLAN).read_text() == resume:
        return staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / MARK).write_text("Written by dfcvae: its stage replaces this folder whole.\n")
    if resume is not None:
        (staging / PLAN).write_text(resume)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by the complete `staging` folder: the old contents stay whole until the
    new are all written, and are removed only after the new are in place."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(target: Path) -> None:
    """After a swap interrupted between its two renames, `target` is missing and `<name>.old` holds
    the last complete contents: put them back."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists() and not target.exists():
        os.rename(old, target)


def check_free_space(path: Path, needed: int, what: str) -> None:
    """DiskFullError when the file system holding `path` has less than `needed` bytes free."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise DiskFullError(disk_full_message(path, needed, what, free))


def disk_full_message(path: Path, needed: int, what: str, free: int | None = None) -> str:
    free = shutil.disk_usage(path).free if free is None else free
    return (
        f"the disk holding {path} is full for {what}: {_mb(free)} free, about {_mb(needed)} needed; "
        "free space there or point the output at a larger disk, and run again (the previous outputs are kept)."
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
