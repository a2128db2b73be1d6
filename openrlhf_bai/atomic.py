"""The one way this package writes a file a user keeps: checked before any work, written to a temp file beside it,
renamed into place. A reader never sees half a file, a failure leaves nothing, and no command writes over an input.

check_output_file(path, inputs, flag)   before the work: refuse a directory, a missing or read-only parent, or a
                                        path that is (or links to) one of the command's inputs or lies inside an
                                        input directory; one BAIError line
write_atomic(path, write)               write(tmp_path) fills a temp file in path's directory, then os.replace
write_text_atomic(path, text)           the same for text
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from openrlhf_bai.errors import BAIError

_UMASK = os.umask(0)
os.umask(_UMASK)  # mkstemp makes 0600 files; a written output gets the mode a plain open() would give it


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when a and b name one file (through symlinks and hard links); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path: str | os.PathLike, inputs=(), flag: str = "output") -> Path:
    """Refuse, in one line, an output file that cannot be written or would replace one of `inputs` (a file, or
    anything inside an input that is a directory: a checkpoint, a TensorBoard run)."""
    path = Path(path)
    for source in inputs:
        if same_file(path, source) or Path(os.path.abspath(path)) == Path(os.path.abspath(source)):
            raise BAIError(f"{flag} {path} is one of the inputs ({source}); "
                           "it would be overwritten: choose another path")
        if os.path.isdir(source) and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(source)):
            raise BAIError(f"{flag} {path} is inside the input directory {source}; choose a path outside it")
    if path.is_dir():
        raise BAIError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not path.is_file():  # a rename would replace the device or pipe itself (/dev/stdout)
        raise BAIError(f"{flag} {path} is not a regular file (a device, pipe or socket); give a file path")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise BAIError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BAIError(f"{flag} {path}: directory {parent} is not writable")
    try:  # os.access answers yes to root, and for places (sysfs, some mounts) that still refuse a new file
        fd, trial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise BAIError(f"{flag} {path}: cannot create a file in {parent} ({e.strerror or e})") from None
    os.close(fd)
    _unlink(trial)
    return path


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call write(tmp) on a temp path beside `path`, then rename it into place; on any failure remove the temp file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=Path(os.path.abspath(path)).parent)
    except OSError as e:
        raise BAIError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise BAIError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _unlink(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
