"""User-facing errors: each class is one kind of failure with its own exit code.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``; no traceback.
Exit codes: 0 ok, 1 internal error (a bug: rerun with EGP_DEBUG=1 for the traceback),
2 bad command line, 3 bad input file, 4 bad data, 5 missing backend, 6 non-finite numbers,
7 verification failed, 8 unsupported model/op, 9 cannot write an output (disk full, quota, read-only
file system, permission), 130 interrupted.
``egp-check`` is the exception: 0 within budget, 1 over budget, 2 for anything it could not measure.
The same cause gets the same code from every command (a 2-input model is 8 everywhere, a NaN
weight or output 6, a missing or unreadable file 3, bad calibration/held-out data 4, ...).
"""

import errno
import re

EXIT_CODES = {
    0: "ok", 1: "internal error (a bug: rerun with EGP_DEBUG=1 for the traceback)", 2: "bad command line",
    3: "bad input file", 4: "bad data", 5: "missing backend", 6: "non-finite numbers (NaN/Inf)",
    7: "verification failed", 8: "unsupported model or op",
    9: "cannot write an output (disk full, quota, read-only file system, permission)", 130: "interrupted",
}


# terminal control sequences (colours, cursor moves) some libraries put in their messages, e.g.
# torch.onnx's "\033[96mThis is step 1/3\033[0m": raw codes in a log or a CI page, never ours to print
_TERMINAL_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def first_words(text: object, limit: int = 200) -> str:
    """The first line of a library's message without its terminal codes, cut at a word boundary
    (with ' ...') beyond ``limit`` characters: one plain line that never stops mid-word."""
    line = _TERMINAL_CODES.sub("", (str(text).strip().splitlines() or [""])[0]).strip()
    if len(line) <= limit:
        return line
    head = line[:limit]
    cut = head.rsplit(" ", 1)[0] if " " in head[limit // 2:] else head
    return cut.rstrip(",;:") + " ..."


EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."


class EgpError(Exception):
    """Base of every failure a user can cause. Subclasses pick a distinct exit code."""

    exit_code = 2


class InputFileError(EgpError):
    """A model/checkpoint/engine file is missing, truncated, of another format or architecture."""

    exit_code = 3


class DataError(EgpError):
    """A data set folder, plugin or calibration tensor is missing, malformed or the wrong shape."""

    exit_code = 4


class BackendUnavailableError(EgpError):
    """A backend (onnxruntime-gpu, TensorRT, CUDA) is not installed or cannot run here."""

    exit_code = 5


class NonFiniteError(EgpError):
    """NaN/Inf in data, loss or model outputs."""

    exit_code = 6


class VerificationError(EgpError):
    """A rewritten graph or engine does not match its reference within tolerance."""

    exit_code = 7


class UnsupportedError(EgpError):
    """A model or option this tool cannot handle (unknown architecture, op, flag combination)."""

    exit_code = 8


class UsageError(EgpError):
    """Bad command-line arguments (contradictory options, output path equal to input, ...)."""

    exit_code = 2


class OutputError(EgpError):
    """An output could not be written: the disk or the quota is full, the file system is read-only,
    or writing was refused. The environment, not the input or a bug; nothing half-written is left."""

    exit_code = 9


# errno values that only a write gets (the disk, the quota, the file size limit, a read-only file
# system), and those that mean the same when the file is known to be an output (permission refused)
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, name))
OUTPUT_ERRNOS = WRITE_ERRNOS | {errno.EACCES, errno.EPERM}


def output_error(e: OSError, path: object = None, output: bool = True) -> "OutputError | None":
    """``e`` as an OutputError naming the file (``path``, else the one the OSError names), or None
    when ``e`` says nothing about an output's place (a missing file, a bad descriptor: bugs). With
    ``output`` False the file may not be an output, and only the errors of a write count."""
    if e.errno not in (OUTPUT_ERRNOS if output else WRITE_ERRNOS):
        return None
    where = path if path is not None else e.filename
    reason = e.strerror or errno.errorcode.get(e.errno, str(e.errno))
    return OutputError(f"cannot write {where}: {reason}; nothing was written there" if where is not None
                       else f"cannot write an output: {reason}; nothing was written")
