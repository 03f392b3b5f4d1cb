"""common.py: the small ideas every part of tinydistil shares, each in one place. Plumbing.

    from common import UserError, atomic_write, pick_device, lr_factor, warmup_steps, build_parser
    raise UserError("what is wrong and what to do")  # the CLI prints this one line, exits 1
    atomic_write(path, b"...")             # a temp file beside path, renamed over it when complete
    append_line(path, json.dumps(row))     # one whole line under a lock: concurrent writers are safe
    with FolderLock(out): ...              # one run per folder; a second one gets a clear line
    device = pick_device("auto")           # cuda when present, else cpu; a bad name: UserError
    lr = peak * lr_factor(step, total, warmup_steps(total, 0.05))  # warm-up, then linear decay

Every write follows one rule: an OSError (a full disk, a read-only folder, no permission) becomes
one UserError line naming the path, the cause and what to do (write_error), and leaves no partial
file behind.

The learning-rate schedule is the reference's (transformers get_linear_schedule_with_warmup, used
by the distillation train.py and by fine-tuning alike), the warm-up rounded up as both round it.
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import io
import json
import math
import os
import secrets
import socket
import sys
import time
import tokenize
import typing
import shutil
from pathlib import Path
from typing import Optional

import torch


class UserError(Exception):
    """A problem the user can fix; the CLI prints its one-line message and exits 1."""


# ----------------------------------------------------------------------------- writes that can fail

ADVICE = {  # errno -> what to do about it
    errno.ENOSPC: "free some space on that disk or write elsewhere",
    errno.EDQUOT: "free some of your disk quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "you may not write there: fix its permissions or write elsewhere",
    errno.EPERM: "you may not write there: fix its permissions or write elsewhere",
}


def write_error(path, error: OSError, advice: str = "") -> UserError:
    """The one line for a failed write: the path, the cause, what to do (advice adds the caller's
    own next step, e.g. how to resume)."""
    cause = error.strerror or str(error)
    todo = ADVICE.get(error.errno, "check the disk and that folder")
    return UserError(f"cannot write {path}: {cause}; {todo}" + (f"; {advice}" if advice else ""))


def os_error_line(error: OSError) -> str:
    """The line for an OSError that no caller turned into a UserError (the CLIs' last resort)."""
    where = f"{error.filename}: " if error.filename else ""
    todo = ADVICE.get(error.errno, "check the disk and that path")
    return f"{where}{error.strerror or error}; {todo}"


@contextlib.contextmanager
def writing(path, advice: str = ""):
    """`with writing(path):` an OSError inside becomes write_error's one line."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e, advice) from None


class _WriteRecorder:
    """A binary file that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError ("unexpected pos ..."), which would hide the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, content, advice: str = ""):
    """Write content (bytes, or a function that writes to a binary file) to a temp file beside path,
    then rename it into place: a reader never sees half a file, and a kill leaves the old one. The
    temp name is unique to this call: processes writing one path never share a half-written file.
    A failed write removes the temp file and raises write_error's UserError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            content(recorder) if callable(content) else f.write(content)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a read-only disk: there is no temp file to remove
            tmp.unlink(missing_ok=True)
        error = e if isinstance(e, OSError) else recorder and recorder.error
        if error:
            raise write_error(path, error, advice) from None
        raise


def append_line(path, line: str, advice: str = ""):
    """Append one line to path as a single write under an exclusive lock (fcntl.flock): lines of
    processes appending at once never interleave. A write that fails (a full disk) is cut back,
    so the file never ends in half a line; a line cut by a killed writer is ended first."""
    path, data = Path(path), (line.rstrip("\n") + "\n").encode()
    with writing(path, advice):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)  # releases the lock


def free_bytes(folder) -> Optional[int]:
    """Free bytes of the disk that holds folder (or its nearest existing parent); None: unknown."""
    folder = Path(folder).absolute()
    for p in (folder, *folder.parents):
        if p.is_dir():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def check_free_space(folder, needed: int, what: str, advice: str):
    """UserError when folder's disk visibly lacks `needed` bytes for `what`."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise UserError(f"{folder} has {free / 2**20:.1f} MiB free, {what} needs about "
                        f"{needed / 2**20:.1f} MiB: {advice}")


# ----------------------------------------------------------------------------- one run per folder

LOCK_FILE = "tinydistil.lock"


class FolderLock:
    """`with FolderLock(folder):` this process is the one run writing folder. The lock file holds
    the pid, host, start time and command of the run; it is held with fcntl.flock, which the
    kernel drops when the process ends however it ends, so a lock left by a killed run is stale:
    the next run takes it over and says so. A second run while the first is alive gets a UserError
    naming it. A folder this lock created is removed again if it is left empty."""

    def __init__(self, folder, what: str = "--out"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self.created = not self.folder.exists()
        self.fd = None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = self._open_locked()
            stale = os.pread(self.fd, 4096, 0).decode(errors="replace")
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(me).encode(), 0)
        except OSError as e:
            self.release()
            todo = ADVICE.get(e.errno, f"give a {what} folder you can write to")
            raise UserError(f"cannot write to {what} {self.folder} ({e.strerror}): {todo}") \
                from None
        if stale.strip():
            print(f"{self.path}: taking over the lock of {describe_holder(stale)}, which has "
                  f"ended", file=sys.stderr)

    def _open_locked(self) -> int:
        """A descriptor of the lock file with the lock held; the file may be replaced while we
        wait for it (a run ending unlinks it), so retry until the locked file is the one there."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                self._remove_if_created()
                raise UserError(f"{self.what} {self.folder} is in use by a running tinydistil "
                                f"run ({describe_holder(holder)}): wait for it to finish or stop "
                                f"it, or choose another {self.what}") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _remove_if_created(self):
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if empty: never a file of someone else's

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        self._remove_if_created()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def describe_holder(text: str) -> str:
    """'pid 123 on host h, started ..., `command`' from a lock file's text."""
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: "
                f"{holder['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


# ----------------------------------------------------------------------------- folders in settings

def check_folder(path, setting: str) -> Path:
    """A folder named by a flag or an environment variable (setting, e.g. "--data-dir" or
    "$TINYDISTIL_DATA"): it need not exist yet, but it and its parents must not be files."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "" if p == path else f" ({p} is a file)"
                raise UserError(f"{setting}: {path} is not a folder{where}: point {setting} at a "
                                f"folder" + (", or unset it" if setting.startswith("$") else ""))
            break
    return path


def check_output_file(path, setting: str) -> Path:
    """A file a command will write at the end (e.g. --json): checked before the work, so a long
    run does not end in a write that could never succeed."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{setting} {path} is a folder: give a file name")
    folder = check_folder(path.parent, setting)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting} {path}: you may not write in {existing}; give a file in a "
                        f"folder you can write to")
    return path


def folder_from_env(var: str) -> Optional[Path]:
    """The folder an environment variable names (~ and $VARS expanded), checked; None if unset."""
    value = os.environ.get(var)
    if not value:
        return None
    return check_folder(os.path.expandvars(value), f"${var}")


def pick_device(name: str = "auto", local_rank=None) -> torch.device:
    """--device as a torch.device: auto is cuda when present, else cpu; under torchrun (local_rank
    set) a bare "cuda" means this process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and name.startswith("cuda:"):  # two ranks on one GPU: NCCL refuses
        raise UserError(f"--device {name} under torchrun: each process takes the GPU of its "
                        f"LOCAL_RANK; pass --device cuda (or auto), and choose the GPUs with "
                        f"CUDA_VISIBLE_DEVICES")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: tinydistil runs on cpu or cuda")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA devices")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype's names


def has_bfloat16_matmul(device: torch.device) -> bool:
    """bfloat16 matmuls run natively on CUDA GPUs of compute capability 8.0 on (A100, RTX 30xx,
    H100) and on CPUs with AVX512-BF16 or AMX; elsewhere (V100, T4, most CPUs) they are emulated,
    several times slower than float32 (studies/teacher_precision.md)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_tf32(device: torch.device) -> str:
    """On CUDA, let float32 matmuls run on TF32 tensor cores (10-bit mantissa inputs, float32
    accumulation), as nanoGPT does: about 8x the strict float32 rate on A100 and H100 (their
    datasheets), where strict float32 would leave the paper recipe's float32 models far below the
    GPU's speed. Returns the line the log shows ("" off CUDA)."""
    if device.type != "cuda":
        return ""
    torch.set_float32_matmul_precision("high")  # matmuls; cuDNN convolutions are TF32 already
    return "float32 matmuls on CUDA run in TF32 (torch.set_float32_matmul_precision('high'))"


def sync(device: torch.device):
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Steps of linear warm-up: the fraction of the run, rounded up (the reference's math.ceil)."""
    return math.ceil(warmup_fraction * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): rises linearly from
    0 over `warmup` steps, then falls linearly to 0 at `total_steps`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def looks_like_path(name: str) -> bool:
    """A --model/--teacher value meant as a local folder rather than a Hub id: absolute, ./ ../ ~,
    or an existing file or folder. Hub ids are 'name' or 'org/name' and never start so."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name)
            or Path(name).expanduser().exists())


# ----------------------------------------------------------------------------- argparse

def field_comments(cls) -> dict:
    """{field name: its trailing comment} for a config dataclass: the help text of its option."""
    comments, pending = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and pending is None and tok.line[:tok.start[1]].strip() == "":
            pending = tok.string  # the first name on a line: a field, if a comment ends the line
        elif tok.type == tokenize.COMMENT and pending:
            comments[pending] = tok.string.lstrip("#").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            pending = None
    return comments


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional=()):
    """One option per field of cls: type and default from the dataclass, help from its comment."""
    comments, hints = field_comments(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        # Optional[X] -> X
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        help_ = f"{comments.get(f.name, '')} (default: {f.default})".strip()
        if f.name in positional:
            parser.add_argument(f.name, type=kind, nargs="?", default=f.default, help=help_)
        elif kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, help=help_,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                                help=help_, metavar=f.name.upper())


def build_parser(cls, description: str, positional=()) -> argparse.ArgumentParser:
    """A parser for one config dataclass (bench.py); tinydistil.py makes a subparser per command."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_args(parser, cls, positional)
    return parser
