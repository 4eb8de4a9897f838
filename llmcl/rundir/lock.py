"""One process at a time on a run directory: `llmcl train` and `llmcl eval` hold <run dir>/lock for their whole
run (rank 0 holds it for every rank of a launch).

The lock is an exclusive flock(2) on the lock file, which the kernel releases when the process dies however it
dies, so a lock left by a killed job is simply taken over; the file names the holder (PID, host, command, since)
for the one-line error a second process gets. Where the file system has no flock (some network file systems),
the file alone decides: its holder must be a live process on this host, else the lock is taken over; a holder
on another host is trusted until its lock file is deleted.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmcl.errors import LlmclError, environment_fault
from llmcl.rundir.layout import LOCK, MANIFEST


class RunLock:
    def __init__(self, run_dir: Path, fd: int, token: str = ""):
        self.run_dir, self.fd = run_dir, fd
        self.token = token  # written into the lock file: the ranks of a launch read it back (locked)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file is a free one (the no-flock fallback reads it)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = -1


def check_run_dir_path(run_dir: Path) -> None:
    """Refuse, in one line, a --run-dir that a run cannot be: a run's stage directory or a model directory
    (nothing is written into those), or a path with a file on its way."""
    if (run_dir / MANIFEST).exists() or (run_dir / "config.json").exists():
        what = "a stage directory of a run" if (run_dir / MANIFEST).exists() else "a model directory"
        raise LlmclError(f"--run-dir {run_dir} is {what}, not a run directory; give the run's own directory, or "
                         "a new or empty one")
    on_its_way = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if on_its_way is not None:
        raise LlmclError(f"{run_dir} has a file where a directory is needed on its way ({on_its_way}); give "
                         "another path or fix this one")


def acquire(run_dir: Path, command: str | None = None) -> RunLock:
    """Take the run directory's lock (creating the directory), or raise a one-line LlmclError naming the holder."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    check_run_dir_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise (environment_fault(exc, path) or exc) from None
    try:
        _flock(fd, path)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)  # on a network file system, what the other nodes' ranks read back (locked)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(run_dir, fd, me["token"])


def _not_shared(run_dir: Path, accelerator: Any, lock: RunLock | None) -> LlmclError | None:
    """Every rank of a launch must see the run directory rank 0 locked: each reads back the token rank 0 wrote
    into the lock file. A node where --run-dir is another (local) directory would otherwise decide for itself
    what is done and where to resume, and train other steps than rank 0, silently, until a collective hangs."""
    import torch
    from accelerate.utils import broadcast_object_list

    token = [lock.token if lock is not None else None]
    broadcast_object_list(token, from_process=0)
    mine = _holder(Path(run_dir) / LOCK).get("token")
    flag = torch.tensor([0.0 if mine == token[0] else 1.0], device=accelerator.device)
    if float(accelerator.reduce(flag, "max")) == 0:
        return None
    where = "" if mine == token[0] else f" (rank {accelerator.process_index} on {socket.gethostname()} does not)"
    return LlmclError(f"run directory {run_dir} is not the one rank 0 locked on every rank{where}: a run "
                      "directory must be on a file system that every node shares")


def _flock(fd: int, path: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        raise _busy(path, _holder(path)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise (environment_fault(exc, path) or exc) from None
    holder = _holder(path)  # no flock here: the file decides
    if holder and holder.get("pid") != os.getpid():
        if holder.get("host") != socket.gethostname():
            raise _busy(path, holder, f"; if that job is gone, delete {path}")
        if _alive(int(holder.get("pid", -1))):
            raise _busy(path, holder)


def _busy(path: Path, holder: dict[str, Any], hint: str = "") -> LlmclError:
    who = (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}, since "
           f"{holder.get('since', '?')})") if holder else "another process"
    return LlmclError(f"{path.parent} is in use by {who}; wait for it to finish or stop it{hint}")


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command() -> str:
    return " ".join(["llmcl", *sys.argv[1:]])[:200]


@contextmanager
def locked(run_dir: Path, accelerator: Any = None) -> Iterator[None]:
    """Hold the run directory's lock for the block. With a launch of several processes rank 0 takes it and
    every rank learns whether it did (all ranks call this at the same point)."""
    lock: RunLock | None = None
    error: BaseException | None = None
    try:
        if accelerator is None or accelerator.is_main_process:
            try:
                lock = acquire(run_dir)
            except Exception as exc:  # noqa: BLE001  (whatever it is, the other ranks must hear of it)
                error = exc
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if error else 0.0], device=accelerator.device)
            if float(accelerator.reduce(flag, "max")) > 0 and error is None:
                error = LlmclError(f"{run_dir} is in use by another process (rank 0 says which)")
            if error is None:
                error = _not_shared(run_dir, accelerator, lock)
        if error is not None:
            raise error
        yield
    finally:
        if lock is not None:
            lock.release()
