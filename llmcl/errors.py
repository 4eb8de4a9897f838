"""Errors a user or the machine can cause. The CLI prints them as one line and exits with their `exit_code`:
2 for a mistake in the input (recipe, data, command line, a damaged run directory), 74 for the environment
(disk full, read-only file system, no permission)."""

from __future__ import annotations

import difflib
import errno
from typing import Any, Iterable

INPUT_EXIT = 2
ENVIRONMENT_EXIT = 74  # EX_IOERR


class LlmclError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = INPUT_EXIT


class RecipeError(LlmclError):
    """A recipe value is wrong: names the YAML key, the value and what was expected."""

    def __init__(self, key: str, value: Any = None, expected: str = "", *, message: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        if message is None:
            message = f"recipe key '{key}': got {value!r}; expected {expected}"
            if isinstance(value, bool) and ("string" in expected or "letters" in expected):
                message += " (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote it)"
        super().__init__(message)


class EnvironmentFault(LlmclError):
    """The machine refused a read or write: a full disk, a read-only file system, missing permissions."""

    exit_code = ENVIRONMENT_EXIT


# errno -> (what it is, the way out)
_ENVIRONMENT = {
    errno.ENOSPC: ("no space left on device", "free some space and rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and rerun the same command"),
    errno.EROFS: ("read-only file system", "write somewhere writable (--run-dir, --to, --out; LLMCL_CACHE for the "
                                           "model cache)"),
    errno.EACCES: ("permission denied", "fix the permissions or write somewhere else (--run-dir, --to, --out; "
                                        "LLMCL_CACHE for the model cache)"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write somewhere else (--run-dir, --to, --out; "
                                             "LLMCL_CACHE for the model cache)"),
    errno.EIO: ("input/output error", "check the disk and rerun the same command"),
}
# the same faults as libraries report them without an errno (safetensors' Rust I/O, torch's zip writer)
_MESSAGES = {"No space left": errno.ENOSPC, "os error 28": errno.ENOSPC, "StorageFull": errno.ENOSPC,
             "Disk quota": errno.EDQUOT, "os error 122": errno.EDQUOT, "Read-only file system": errno.EROFS,
             "os error 30": errno.EROFS, "Permission denied": errno.EACCES, "os error 13": errno.EACCES,
             "file write failed": errno.ENOSPC}


def environment_fault(exc: BaseException, path: Any = None) -> EnvironmentFault | None:
    """The one-line EnvironmentFault for `exc` (or an exception it was raised from) when the machine caused it,
    naming `path` (default: the file the OSError names); None when it is something else."""
    seen: BaseException | None = exc
    while seen is not None:
        code = None
        if isinstance(seen, OSError) and seen.errno in _ENVIRONMENT:
            code = seen.errno
            path = path or seen.filename
        elif _library_io_error(seen):
            code = next((c for text, c in _MESSAGES.items() if text in str(seen)), None)
        if code is not None:
            what, way_out = _ENVIRONMENT[code]
            where = f"{path}: " if path else ""
            return EnvironmentFault(f"{where}{what}; {way_out} (finished stages are kept)")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


# errno -> what a path the user gave (a --run-dir, --to, --out, --markdown, --json, HOME) is instead
_PATHS = {
    errno.ENOENT: "does not exist (nor does a directory on its way)",
    errno.ENOTDIR: "has a file where a directory is needed on its way",
    errno.EISDIR: "is a directory where a file is needed",
    errno.EEXIST: "exists and is not a directory (a file, or a link to nothing)",
    errno.ELOOP: "has a loop of symbolic links",
    errno.ENAMETOOLONG: "is too long a name",
}


def path_fault(exc: BaseException) -> LlmclError | None:
    """The one-line input error for an OSError about a path that is not what it must be (a file where a
    directory goes, a missing directory, a dangling link), naming the path; None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _PATHS and exc.filename:
        return LlmclError(f"{exc.filename} {_PATHS[exc.errno]}; give another path or fix this one")
    return None


def _library_io_error(exc: BaseException) -> bool:
    """An I/O failure reported without an errno: safetensors' (Rust) errors and torch's zip writer."""
    if type(exc).__name__ == "SafetensorError":
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in ("PytorchStreamWriter", "inline_container"))


def did_you_mean(name: str, options: Iterable[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the nearest options, or a list of valid names when none is near.

    `prefix` (e.g. 'train.') is put before each suggestion so it reads as a full recipe key."""
    options = sorted(set(options))
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    if near:
        return " (did you mean " + " or ".join(f"'{prefix}{n}'" for n in near) + "?)"
    if not options or len(options) > 30:
        return ""
    return " (valid: " + ", ".join(prefix + o for o in options) + ")"


# what a collective operation says when the process at the other end is gone (gloo, NCCL, the TCP store)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "ProcessGroupNCCL's watchdog", "Socket Timeout", "recvValue failed")


def peer_lost(exc: BaseException) -> EnvironmentFault | None:
    """Under a launch of several processes, a collective operation that failed because another process left it
    (that process stopped on a signal, or failed with its own one-line error): one line here too, not a
    traceback; None when it is something else, or a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch.distributed as dist

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, dist.DistError) or (isinstance(seen, RuntimeError)
                                                and any(t in str(seen) for t in _PEER_GONE)):
            rank = os.environ.get("RANK", "?")
            first = str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__
            return EnvironmentFault(f"rank {rank}: another process of this launch left a collective operation (it "
                                    f"stopped or failed, and its own line says why): {first[:200]}; rerun the same "
                                    "command once that is fixed (finished stages are kept)")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None

