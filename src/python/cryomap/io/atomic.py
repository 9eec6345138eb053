"""Atomic file writes and output-folder checks.

Every writer of this package writes through `atomic_path`: a temporary file `.NAME.XXXXXXXX
[SUFFIX].tmp` in the target's folder, renamed onto the target on success. A write that fails
(disk full, no permission) leaves the old file intact and raises one InputError line; a
process killed in the middle of a write leaves only its temporary file, which
`remove_stale_temps` deletes on the next start in that folder.

`check_output_dir` / `check_output_file` check an output location before any work starts
(nothing is created); `make_output_dir` creates a folder once every check has passed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

PathLike = str | os.PathLike

#: Names of the temporary files made by atomic_path: "." + target name + "." + mkstemp's 8
#: random characters + optional suffix (".npz", ".png") + ".tmp".
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?\.tmp$")


def _os_error(path: Path, action: str, e: OSError) -> InputError:
    """One line for an OS error on an output path (disk full, no permission, ...)."""
    return InputError(f"{path}: cannot {action} ({e.strerror or e})")


@contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Context manager yielding a temporary path next to `path`, moved onto `path` on success.

    Used by every writer of this package so that a failed or interrupted write leaves the old
    file (if any) intact. On error the temporary file is removed; an OSError (disk full, no
    permission, ...) becomes an InputError naming `path`, any other error is re-raised.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    # Same folder as the target, so os.replace is an atomic rename on one filesystem.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp",
                                    dir=folder)
        os.close(fd)
    except OSError as e:
        raise _os_error(path, "write", e) from None
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the usual umask-based permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(path, "write", e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stale_temps(folder: PathLike, name: str | None = None) -> list[Path]:
    """Temporary files of interrupted atomic writes in `folder` (only those of the target
    file `name` when given), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = TEMP_PATTERN.match(p.name)
        if m and (name is None or m.group("name") == name) and p.is_file():
            out.append(p)
    return sorted(out)


def remove_stale_temps(folder: PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in `folder` (of the
    target `name` only, when given); returns those removed. A run starting in a folder owns
    it: a temporary file there is never one that another write still needs."""
    removed = []
    for p in stale_temps(folder, name):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(p, "remove a stale temporary file", e) from None
    return removed


def _writable_dir(path: Path) -> bool:
    """A folder we may create files in (root passes os.access; read-only mounts do not)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return True


def check_output_dir(path: PathLike, option: str = "--o") -> None:
    """Check, without creating anything, that `path` is or can be made a writable folder:
    InputError (one line naming the option and the path) when it is a file, or not
    writable, or its nearest existing parent is not a writable folder."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise InputError(f"{option} {path}: exists and is not a folder; expected an output "
                             f"folder")
        if not _writable_dir(path):
            raise InputError(f"{option} {path}: the folder is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is not a folder; expected an output "
                         f"folder")
    if not _writable_dir(parent):
        raise InputError(f"{option} {path}: cannot create the folder ({parent} is not "
                         f"writable)")


def make_output_dir(path: PathLike, option: str = "--o") -> Path:
    """Create the output folder (and its parents); an OS error becomes one InputError line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot create the output folder "
                         f"({e.strerror or e})") from None
    return path


def check_output_file(path: PathLike, option: str = "--o") -> None:
    """Check, without creating anything, that the file `path` can be written: its folder
    exists and is writable, and `path` is not a folder."""
    path = Path(path)
    folder = path.absolute().parent
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder; expected a file name")
    if not folder.is_dir():
        raise InputError(f"{option} {path}: output folder {path.parent} does not exist")
    if not _writable_dir(folder):
        raise InputError(f"{option} {path}: the folder {path.parent} is not writable")
