"""An output folder claimed by one job: another job's results are never mixed in, replaced or written through.

    folder = OutputFolder(path, owned=RUN_OUTPUTS, what="training run", overwrite=False, resume=False)
    folder.check()            # cheap, before anything is loaded: refuses a folder holding a previous job's outputs
    with folder.claimed():    # while the job runs: an exclusive lock; with overwrite, the previous outputs go first
        ...

A folder holding any of the job's own outputs (`owned`: names or glob patterns) is refused unless the job resumes
it or `overwrite` replaces it (then exactly those entries are removed, and the job says so). Files the job does not
own are left alone. The lock (`.msd_lora.lock`, `flock`) makes a second job into the same folder fail at once
instead of both "succeeding" with one's results lost; the kernel drops it when the process ends, however it ends.
Entries the job writes into must not be symbolic links: a link planted there would send the writes elsewhere.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msd_lora.errors import RunFolderError, UnwritablePathError

LOCK_NAME = ".msd_lora.lock"


class OutputFolder:
    def __init__(self, path: str | Path, owned: tuple[str, ...], what: str, overwrite: bool = False,
                 resume: bool = False, flag: str = "output_path"):
        self.path, self.owned, self.what = Path(path), owned, what
        self.overwrite, self.resume, self.flag = overwrite, resume, flag
        self.replaced: list[str] = []  # what `claimed` removed, for the job's log

    def previous_outputs(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = {p for pattern in self.owned for p in self.path.glob(pattern)}
        return sorted(found | {p for p in self.path.iterdir() if p.is_symlink() and p.name in self.owned})

    def check(self) -> None:
        """Refuse a path that is not a writable folder, or one holding a previous job's outputs (unless resume or
        overwrite); never changes anything on disk beyond creating the folder."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UnwritablePathError(f"{self.flag} '{self.path}' cannot be created ({err.strerror}); choose another "
                                      f"folder with --{self.flag}") from err
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise UnwritablePathError(f"{self.flag} '{self.path}' is not writable; choose another folder with "
                                      f"--{self.flag}")
        found = self.previous_outputs()
        links = [p.name for p in found if p.is_symlink()]
        if links and not self.overwrite:
            raise RunFolderError(f"{self.flag} '{self.path}' holds symbolic links where the {self.what} writes "
                                 f"({', '.join(links)}): msd-lora does not write through links. Remove them, or pass "
                                 f"--overwrite True to replace them")
        if found and not (self.resume or self.overwrite):
            names = ", ".join(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in found[:5])
            how = "--resume True to continue it, " if self.what == "training run" else ""
            raise RunFolderError(f"{self.flag} '{self.path}' holds a previous {self.what} ({names}): pass {how}"
                                 f"--overwrite True to replace it, or choose another --{self.flag}")

    @contextmanager
    def claimed(self) -> Iterator[Path]:
        """Lock the folder for this job (refusing one in use), re-check it, and with overwrite remove the previous
        outputs; the lock is released when the block ends."""
        self.check()
        fd = _lock(self.path / LOCK_NAME, self.flag)
        try:
            if self.overwrite:
                self.replaced = [remove(p) for p in self.previous_outputs()]
            yield self.path
        finally:
            os.close(fd)  # closing the descriptor drops the flock


def _lock(path: Path, flag: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise UnwritablePathError(f"{flag}: cannot create the lock file {path} ({err.strerror})") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"{flag} '{path.parent}' is in use by another msd-lora job (pid {holder}); wait for it "
                             f"to finish or choose another --{flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def remove(path: Path) -> str:
    """Delete a file, a link (not what it points to) or a folder tree; returns the name removed."""
    name = path.name + ("/" if path.is_dir() and not path.is_symlink() else "")
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
    return name


def open_for_writing(path: str | Path, append: bool = False):
    """A text file opened for writing without following a link at `path` (a planted link is an error)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnwritablePathError(f"{path} is a symbolic link: msd-lora does not write through links; remove "
                                      f"it") from err
        raise
    return os.fdopen(fd, "a" if append else "w", newline="", encoding="utf-8")
