"""common.py: the small ideas every part of tinydistil shares, each in one place. Plumbing.

    from common import UserError, atomic_write, pick_device, lr_factor, warmup_steps, build_parser
    raise UserError("what is wrong and what to do")  # the CLI prints this one line, exits 1
    atomic_write(path, b"...")             # a temp file beside path, renamed over it when complete
    device = pick_device("auto")           # cuda when present, else cpu; a bad name: UserError
    lr = peak * lr_factor(step, total, warmup_steps(total, 0.05))  # warm-up, then linear decay

The learning-rate schedule is the reference's (transformers get_linear_schedule_with_warmup, used
by the distillation train.py and by fine-tuning alike), the warm-up rounded up as both round it.
"""
import argparse
import dataclasses
import io
import math
import os
import secrets
import tokenize
import typing
from pathlib import Path

import torch


class UserError(Exception):
    """A problem the user can fix; the CLI prints its one-line message and exits 1."""


def atomic_write(path, content):
    """Write content (bytes, or a function that writes to a binary file) to a temp file beside path,
    then rename it into place: a reader never sees half a file, and a kill leaves the old one. The
    temp name is unique to this call: processes writing one path never share a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            content(f) if callable(content) else f.write(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    import inspect
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
