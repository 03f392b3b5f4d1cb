"""fast.py: the fast CPU inference modes of bench.py, chosen from what this CPU has, and the memory
bound they are measured against (paper section 4.2, Table 3, and past it: the int8 and bfloat16
students a deployer would run). Plumbing: the method is in model.py; nothing here trains.

    import fast
    kind = fast.detect_cpu()                 # flags, torch's capability, the int8 engine, bf16
    with fast.quantized_engine(kind.int8_engine):
        ...                                  # int8 weights packed for that engine's kernels
    graph = fast.compile_frozen(model)       # one frozen graph: no Python between operators
    graph = fast.compile_frozen(model, script=True)   # the same by TorchScript (int8)
    fast.copy_bandwidth()                    # bytes/s one thread copies, STREAM's way of counting
    fast.pass_bytes(model, "int8")           # bytes of weights one batch-1 pass must read

At batch size 1 every weight matrix is read once per pass and used for a few dozen tokens, so the
time a pass needs at least is the bytes of its weights over the memory bandwidth: DistilBERT's 42.5M
layer weights are 170 MB in float32, 85 MB in bfloat16, 43 MB in int8. The rest is arithmetic and
the overhead of running about a hundred small operators one by one from Python.
"""
import contextlib
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common import UserError
from model import BERT, Output

BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


# ----------------------------------------------------------------------------- the CPU

def cpu_flags(cpuinfo=Path("/proc/cpuinfo")) -> frozenset:
    """The instruction-set flags the kernel reports for the first CPU (empty where unknown)."""
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True)
class CpuKind:
    """What the fast modes need to know about a CPU: its name, flags and torch's capability level
    (torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, AVX512_BF16, AMX...)."""
    name: str
    flags: frozenset
    capability: str

    @property
    def vnni(self) -> bool:
        """8-bit dot products summed in int32 in one instruction (VNNI, or AMX's tiles)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 dot products in hardware; elsewhere they are emulated, slower than float32."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def int8_engine(self) -> str:
        """The quantized engine whose dynamic int8 Linear is fastest here. oneDNN uses VNNI and
        AMX; fbgemm is tuned for AVX2 and AVX-512 without them. scripts/bench/probe_cpu_modes.py
        measures them (studies/cpu_modes.md): on Zen 5 (VNNI) oneDNN's kernel alone takes 0.7 to
        0.9x fbgemm's time, a whole pass about the same; issue 20 saw 0.5x with AMX."""
        engines = torch.backends.quantized.supported_engines
        if self.vnni and "onednn" in engines:
            return "onednn"
        return "fbgemm" if "fbgemm" in engines else torch.backends.quantized.engine

    def describe(self) -> str:
        """One line: the model name and what the fast modes use of it."""
        units = [f for f in ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx_vnni",
                             "avx512f", "avx2") if f in self.flags]
        return (f"{self.name} ({', '.join(units) or 'no AVX2'}; torch {self.capability}): int8 "
                f"through {self.int8_engine}, bfloat16 "
                f"{'native' if self.native_bf16 else 'emulated, left out'}")


def cpu_model_name(cpuinfo=Path("/proc/cpuinfo")) -> str:
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown CPU"


def detect_cpu() -> CpuKind:
    return CpuKind(cpu_model_name(), cpu_flags(), torch.backends.cpu.get_cpu_capability())


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Pack int8 weights for engine: a packed weight keeps the kernels it was packed for."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


# ----------------------------------------------------------------------------- the memory bound

def pass_bytes(model: nn.Module, mode: str) -> int:
    """Bytes of weights one batch-1 pass of model (a BERT) must read in mode: every weight matrix
    of the layers and the pooler at the mode's width (int8: 1 byte, and a float32 scale per row),
    their biases and LayerNorms at float32 (int8) or the mode's width. The embedding tables are
    left out: a pass reads only its tokens' rows of them."""
    dtype = mode.partition("+")[0]
    width = BYTES_PER_WEIGHT[dtype]
    small = 4 if dtype == "int8" else width
    total = 0
    for module in [*model.layers, model.pooler]:
        for p in module.parameters() if module is not None else ():
            if p.dim() == 2:
                total += p.numel() * width + (4 * p.shape[0] if dtype == "int8" else 0)
            else:
                total += p.numel() * small
    return total


def copy_bandwidth(mib=256, repeats=5) -> float:
    """Bytes per second one thread moves copying a buffer of mib MiB (far larger than the caches)
    into another, counted as STREAM's Copy counts: bytes read plus bytes written. Best of
    repeats, after one untimed copy that maps the pages."""
    src = torch.ones(mib << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.copy_(src)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * src.numel() / best


def floor_seconds(n_bytes: int, bandwidth: float) -> float:
    """The least time reading n_bytes can take at bandwidth bytes/s."""
    return n_bytes / bandwidth


# ----------------------------------------------------------------------------- without Python

def cpp_compiler():
    """The C++ compiler torch.compile's CPU code generator would call ($CXX, g++, clang++), or
    None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_frozen(model: nn.Module, script=False) -> nn.Module:
    """model as one graph compiled by torch.compile (inductor), with no Python between operators:
    its weights frozen in as constants (so LayerNorms, GELUs and residual adds fuse into a few C++
    loops and weights are packed once), the graph driven from C++ (cpp_wrapper), one graph for
    every sequence length (dynamic). script: TorchScript instead (FrozenScript), for int8. It
    compiles on the first call, which it makes here and times: .compile_seconds."""
    if script:
        graph = FrozenScript(model)
    elif cpp_compiler() is None:
        raise UserError("the compiled modes need a C++ compiler for torch.compile (g++ or "
                        "clang++, or $CXX): install one (apt install g++) or leave them out")
    else:
        import torch._inductor.config as inductor
        inductor.freezing = True  # read whenever a graph compiles, so set for them all
        inductor.cpp_wrapper = True
        graph = torch.compile(model, dynamic=True, fullgraph=True)
    ids = torch.zeros((1, 16), dtype=torch.long)  # any ids, any length but 0 and 1
    example = {"input_ids": ids}
    if isinstance(model, BERT):  # as bench.py calls it: a new call signature compiles anew
        types = torch.zeros_like(ids) if model.config.type_vocab_size else None
        example.update(attention_mask=None, token_type_ids=types, return_logits=False)
    start = time.perf_counter()
    with torch.inference_mode():
        graph(**example)
    graph.compile_seconds = time.perf_counter() - start
    return graph


class TensorsOnly(nn.Module):
    """model called with the given inputs by name, its Output as a tuple of tensors: what
    TorchScript's tracer takes."""

    def __init__(self, model: nn.Module, names: tuple):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors))
        if not isinstance(self.model, BERT):  # a TaskModel: its logits
            return self.model(**kwargs)
        out = self.model(**kwargs, return_logits=False)
        pooled = () if out.pooler_output is None else (out.pooler_output,)
        return (out.hidden_states[-1], *pooled)


class FrozenScript(nn.Module):
    """model (a BERT or TaskModel) run by TorchScript, no Python between operators: traced on its
    first call with each set of inputs given (input_ids and, or not, a mask and token types), then
    frozen, its weights and int8 packed weights folded in as constants. The compiled form of the
    int8 modes, whose packed weights torch.compile cannot trace; needs no C++ compiler. A BERT
    returns only its last hidden states (and pooler output): all a head reads. torch 2.13 marks
    TorchScript deprecated; until torch.compile traces packed int8 weights it is the way here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.graphs = model, {}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_logits=False):
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids}
        given = {name: t for name, t in given.items() if t is not None}
        names = tuple(given)
        if names not in self.graphs:
            with warnings.catch_warnings():  # its deprecation, and BERT's length check kept
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(TensorsOnly(self.model, names), tuple(given.values()),
                                         check_trace=False)
                self.graphs[names] = torch.jit.freeze(traced.eval())
        out = self.graphs[names](*given.values())
        if not isinstance(self.model, BERT):
            return out
        return Output((out[0],), None, out[1] if len(out) > 1 else None)
