"""Outputs that appear whole or not at all, exactly where asked (issue #16 section 3).

A writer stages its output in a hidden sibling (`staging`), then `publish`es it with one rename. Around that:
- `check_name`: an output name is a plain file name, so `-n ../X` cannot write outside the output directory;
- `made_parents`: folders created for the output are removed again if the run fails;
- `exit_on_signals`: SIGTERM / SIGHUP raise SystemExit like SIGINT raises KeyboardInterrupt, so the writer's
  cleanup runs (SIGKILL cannot be caught: there `remove_stale` does it on the next run);
- `remove_stale`: staging siblings whose process is provably gone (same host, no such pid) are removed;
- `publish(replace=False)` (a folder) and `publish_file` claim the name atomically at the last moment, so of two
  concurrent runs to one output, one wins and the other fails cleanly instead of the last one silently winning.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from afm_mlx.errors import AFMError

_HOST = socket.gethostname()


def write_folder(target: Path, fill: Callable[[Path], object], replace: bool, tag: str = "writing") -> object:
    """Create the folder `target` whole or not at all: `fill(staged)` writes its files into a staging sibling,
    which is then published; returns what `fill` returned. On any failure or SIGINT/SIGTERM/SIGHUP, the staging
    folder and the parents made for `target` are removed."""
    with exit_on_signals(), made_parents(target.parent):
        remove_stale(target, (tag, "replaced"))
        staged = staging(target, tag)
        try:
            result = fill(staged)
            publish(staged, target, replace)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return result


def check_name(name: str, what: str = "output name") -> str:
    """`name` if it is a plain file name (no folder part, not hidden, no NUL), else AFMError."""
    if (not name or name in (".", "..") or name.startswith(".") or "\0" in name
            or any(sep in name for sep in ("/", "\\", os.sep))):
        raise AFMError(f"invalid {what} {name!r}: use a plain file name (no '/', not starting with '.')")
    return name


@contextlib.contextmanager
def made_parents(folder: Path) -> Iterator[None]:
    """Create `folder` (and missing parents) for the body; if the body fails, remove the ones created here."""
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:  # innermost first; a folder someone else filled meanwhile stays
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def staging(target: Path, tag: str) -> Path:
    """A new hidden folder next to `target`, named `.NAME.TAG-PID@HOST-RANDOM` so `remove_stale` can tell
    whether its writer is still alive (RANDOM: two writers in one process never share it)."""
    return Path(tempfile.mkdtemp(prefix=_staging_prefix(target, tag), dir=target.parent))


def staging_file(target: Path, tag: str) -> Path:
    """A new empty hidden file next to `target`, named as `staging` names folders."""
    handle, name = tempfile.mkstemp(prefix=_staging_prefix(target, tag), dir=target.parent)
    os.close(handle)
    return Path(name)


def _staging_prefix(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-{os.getpid()}@{_HOST}-"


def remove_stale(target: Path, tags: tuple[str, ...]) -> None:
    """Remove `target`'s staging siblings (any of `tags`) left by processes of this host that no longer exist."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:{'|'.join(tags)})-(\d+)(?:@(.+)-[a-z0-9_]+)?")
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            found = pattern.fullmatch(entry.name)
            if found and found[2] in (None, _HOST) and not _alive(int(found[1])):
                _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot ask about): not provably gone
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def publish(staged: Path, target: Path, replace: bool) -> None:
    """Move the finished `staged` folder to `target` in one rename.

    replace=False: `target` is claimed with mkdir (atomic: of two runs only one can create it), then `staged`
    renamed over the empty claim; a run that lost fails with AFMError. replace=True: an existing `target` is
    moved aside first and removed only once the new one is in place."""
    if not replace:
        try:
            target.mkdir()
        except FileExistsError:
            raise _exists(target) from None
        try:
            os.replace(staged, target)
        except BaseException:
            target.rmdir()
            raise
        return
    old = None
    if target.exists() or target.is_symlink():
        old = staging(target, "replaced")
        os.replace(target, old / target.name)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_file(staged: Path, target: Path) -> None:
    """Move the finished file `staged` to `target` unless `target` exists, atomically: a hard link never replaces
    (where the file system has none, the name is claimed with O_EXCL and the file renamed over the claim)."""
    try:
        os.link(staged, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError:
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise _exists(target) from None
        os.replace(staged, target)
        return
    os.unlink(staged)


def _exists(target: Path) -> AFMError:
    return AFMError(f"{target} already exists (another run wrote it first?); pass --force / --overwrite to "
                    "replace it")


class _Signalled(SystemExit):
    """SIGTERM / SIGHUP as an exception: exit status 128 + signal number, as the shell reports a signal death."""


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """While the body runs, SIGTERM and SIGHUP raise SystemExit (so `except BaseException` cleanups and `finally`
    blocks run) where they would kill the process outright. Handlers someone else installed stay; only the main
    thread can take signals. The signal wins over whatever exception it turned into on the way out (raised
    inside an import, it surfaces as ImportError)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        raise _Signalled(128 + signum)

    previous = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    except BaseException as err:
        if received and not isinstance(err, _Signalled):
            raise _Signalled(128 + received[0]) from None
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
