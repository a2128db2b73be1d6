"""The one way a command writes a directory a user keeps (a merged checkpoint); atomic.py is the same for one file.

check_output_dir(output, done, overwrite)   before any work: one BAIError line for an output that cannot be
                                            written (under a file, a dangling symlink, a mount point, read-only,
                                            non-empty without overwrite); True when done(output) says it already
                                            holds the result
write_dir(output, write, done=, overwrite=, size=)
                                            under a lock beside output: remove what killed writers left, reuse a
                                            done output, else write(tmp) fills a temporary directory beside it,
                                            which is renamed into place. On any failure (SIGTERM and Ctrl-C
                                            included) nothing is left: no temporary directory, no lock file, no
                                            parent directory it created.
existing_parent(path)                       the nearest existing directory (where free space is measured)
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from openrlhf_bai.errors import BAIError

# A writer works in .NAME.tmp-OWNER-XXXX beside the output (and moves a replaced output to .NAME.old-OWNER-XXXX);
# SIGKILL, an OOM kill or a power loss leaves them. OWNER = host-bootid-pid-starttime of the writing process.
STALE_FOREIGN_S = 600  # a directory of another host (or without owner) counts as dead after this long unwritten


def existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(output: Path, done, overwrite: bool) -> bool:
    """Refuse, in one line, an output directory that cannot be written; True if done(output) holds already."""
    output = Path(output)
    if output.is_symlink() and not output.exists():
        raise BAIError(f"output {output} is a symlink to {os.readlink(output)}, which does not exist; "
                       "remove the link or give another path")
    ancestor = output
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if ancestor != output and not ancestor.is_dir():
        raise BAIError(f"output {output}: {ancestor} is a file, not a directory")
    if output.exists() and not output.is_dir():
        raise BAIError(f"output {output} exists and is not a directory")
    real = output.resolve()
    if output.exists() and os.path.ismount(real):
        raise BAIError(f"output {output} is a mount point, which cannot be replaced by a rename; "
                       "give a directory inside it")
    if done(real):
        return True
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise BAIError(f"output directory {output} exists and is not empty; pass --overwrite to replace it")
    place = existing_parent(real.parent)
    if not os.access(place, os.W_OK | os.X_OK):  # false for root too on a read-only filesystem
        why = "is on a read-only file system" if os.statvfs(place).f_flag & os.ST_RDONLY else "is not writable"
        raise BAIError(f"output {output}: {place} {why}")
    return False


def write_dir(output: str | os.PathLike, write, *, done, overwrite: bool, size) -> bool:
    """Write directory `output` through write(tmp) and return False, or return True when done(output) already holds
    (see the module docstring). A symlink to a directory is written through: its target is replaced. size() gives
    the bytes the output will take (asked only when it is written)."""
    output = Path(output).expanduser().absolute()
    if check_output_dir(output, done, overwrite) and not _leftovers(output.resolve()):
        return True
    real = output.resolve()
    created = _make_parents(real.parent, output)
    try:
        with _locked(real.parent / f".{real.name}.lock", output):
            remove_stale(real)  # before the disk check: a killed writer's leftovers may be what fills the disk
            if check_output_dir(output, done, overwrite):  # another process finished it while we waited
                return True
            free, size = shutil.disk_usage(real.parent).free, size()
            if free < size:
                raise BAIError(f"not enough disk for {output}: {_size(size)} needed, {_size(free)} free")
            _write_and_swap(real, write, output, size)
            return False
    except BaseException:
        for d in created:  # deepest first; a directory someone else has put something in meanwhile stays
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _write_and_swap(real: Path, write, output: Path, size: int) -> None:
    # The owner in the name lets the next writer tell a dead writer's directory from a live one (remove_stale).
    owner = _owner_tag()
    tmp = Path(_os_call(output, tempfile.mkdtemp, prefix=f".{real.name}.tmp-{owner}-", dir=real.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from other users of a shared FS
    # SIGTERM's default action would end the process without the cleanup below; as an exception it runs it.
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        write(tmp)
        if real.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-{owner}-", dir=real.parent))
            try:
                os.replace(real, old / "d")
            except OSError:
                old.rmdir()
                raise
            try:
                os.replace(tmp, real)
            except OSError:
                os.replace(old / "d", real)
                old.rmdir()
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, real)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(real.parent).free
            raise BAIError(f"disk full while writing {output}: the merge needs {_size(size)}, {_size(free)} are free; "
                           "nothing was left behind") from None
        if isinstance(e, OSError):
            raise BAIError(f"cannot write {output}: {e.strerror or e}; nothing was left behind") from None
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            print(f"openrlhf-bai: merge into {output} interrupted; its temporary directory was removed",
                  file=sys.stderr)
        raise
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _os_call(output: Path, fn, *args, **kwargs):
    """fn(...), an OSError (read-only file system, permissions, a file in the way) as one BAIError line."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise BAIError(f"cannot write {output}: {e.strerror or e}{where}") from None


def _make_parents(directory: Path, output: Path) -> list[Path]:
    """mkdir -p directory; the directories it created, deepest first (removed again if the write fails)."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        _os_call(output, d.mkdir)
    return missing


@contextmanager
def _locked(path: Path, output: Path):
    """An exclusive flock on `path`, unlinked (still held) on release, so no lock file outlives the write. A waiter
    that wakes to find the file unlinked or replaced locks the current one instead, so two writers never both hold
    the lock. Read-only descriptors: another user may lock a file this one created."""
    while True:
        fd = _os_call(output, os.open, path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
                same = (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# --- leftovers of killed writers -----------------------------------------------------------------------------------


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{_boot_id()}-{os.getpid()}-{_start_time(os.getpid())}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
    except IndexError:
        return "0"


def _leftovers(output: Path) -> list[Path]:
    return [p for pattern in (".tmp-*", ".old-*") for p in output.parent.glob(f".{output.name}{pattern}")]


def _is_dead(leftover: Path, output: Path) -> bool:
    """Called under the output's lock, which every writer of it holds while it writes: a leftover's owner is gone.
    Still checked, in case the lock does not reach across hosts (some shared filesystems keep locks node-local):
    on this host the owning process must be gone; of another host, the directory must have been unwritten for
    STALE_FOREIGN_S (a live merge writes continuously)."""
    host = socket.gethostname()
    for kind in (".tmp-", ".old-"):
        prefix = f".{output.name}{kind}{host}-"
        owner = leftover.name[len(prefix):].split("-") if leftover.name.startswith(prefix) else []
        if len(owner) == 4:  # boot id, pid, start time, mkdtemp's random part
            if owner[0] != _boot_id():
                return True  # the host restarted since
            return not owner[1].isdigit() or _start_time(int(owner[1])) != owner[2]
    try:
        last_write = max([leftover.stat().st_mtime] + [f.stat().st_mtime for f in leftover.iterdir()])
    except OSError:
        return True
    return time.time() - last_write > STALE_FOREIGN_S


def remove_stale(output: Path) -> None:
    """Remove the temporary directories of dead writers of `output` (hold its lock); say how much was freed."""
    removed, freed = 0, 0
    for leftover in _leftovers(output):
        if _is_dead(leftover, output):
            freed += sum(f.stat().st_blocks * 512 for f in leftover.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
    if removed:
        print(f"openrlhf-bai: removed {removed} temporary director{'y' if removed == 1 else 'ies'} of killed merges "
              f"into {output}, {_size(freed)} freed", file=sys.stderr)
