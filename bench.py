"""bench.py: size and inference speed of BERT-base, DistilBERT and our students, as the paper's
Table 3 (section 4.2, "Size and inference speed"), then the cheap CPU wins a deployment engineer
would try.

    python bench.py                         # BERT-base, DistilBERT (+ out/student), CPU, 1 thread
    python bench.py --models out/student --limit 200 --json bench.json
    python bench.py --models /tmp/minilm-sst2 --task sst2   # + SST-2 dev accuracy of every mode
    python bench.py --throughput            # + examples/s at batch 1, 8, 32, all threads
    python bench.py --pretrain-step         # tokens/s and MFU of one distillation step
    python bench.py --help                  # every option, with its default

Table 3 times "a full pass of GLUE task STS-B ... on CPU using a batch size of 1". So do we: every
pair of STS-B dev (from the data directory, else shipped stand-in pairs of STS-B-like lengths) is
tokenised first (timed on its own), then fed one at a time, unpadded, to every model and mode in
turn, so a busy machine slows them alike. Parameters are the encoder's (BertModel /
DistilBertModel, no MLM head), as the paper counts them. Speed does not depend on weight values, so
a checkpoint that cannot be had (offline, nothing cached) is built from its preset or config.json
with random weights, said in the rows. Speed-ups are over BERT-base float32 when a model of
BERT-base's shape is in the run, as the paper's are; otherwise over the run's first model, which
the column then names.

Modes: CPU float32, bfloat16 (weights and activations), int8 (every Linear: int8 weights,
activations quantised per call); CUDA float32, float16, bfloat16. "+cls" makes the last layer
compute the [CLS] row only, all an STS-B or SST-2 head reads; "+compiled" runs the model as one
graph compiled by torch.compile, with no Python between operators (fast.py). Every mode runs with
q/k/v fused into one matmul. These are inference-only rewrites of a loaded model, kept here so that
model.py stays simple. Which CPU modes run unless --dtypes says otherwise follows from the CPU
(fast.CpuKind): int8 through the quantized engine fastest on it (oneDNN with VNNI or AMX, else
fbgemm), bfloat16 only where it is native, the compiled modes only with a C++ compiler. Each CPU
row also shows its memory bound: the megabytes of weights one pass reads, and its time as a
multiple of the least time that reading can take at the copy bandwidth measured in the run.
"""
import copy
import json
import resource
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import fast
import tinydistil
from common import (DTYPES, UserError, atomic_write, build_parser, check_output_file,
                    looks_like_path, os_error_line, pick_device, sync, use_tf32)
from hub import NoCheckpointFolder, checkpoint_folder
from data import mask_batch
from harness import ADAMW_BETAS, ADAMW_EPS, flops_per_token, peak_flops
from model import BERT, Attention, BertConfig, configure_optimizers
from tasks import glue
from tasks.heads import TaskModel

STAND_IN = Path(__file__).resolve().parent / "fixtures" / "bench"  # pairs; bert-base-uncased vocab
PAPER = [("ELMo", 180, 895), ("BERT-base", 110, 668), ("DistilBERT", 66, 410)]  # M params, seconds
PRESETS = ("bert-base-uncased", "distilbert-base-uncased")
MODES = {"cpu": ("float32", "bfloat16", "int8", "int8+cls", "float32+compiled",
                 "bfloat16+compiled", "int8+cls+compiled"),
         "cuda": ("float32", "float16", "bfloat16")}
ALL_MODES = tuple(dict.fromkeys(MODES["cpu"] + MODES["cuda"]))
ALL_THREADS = torch.get_num_threads()  # before --threads: the throughput runs use them all
MAX_LEN = 128  # as in fine-tuning; the longest STS-B dev pair has 87 tokens
WARMUP = 10  # examples run before the clock starts


CPU = fast.detect_cpu()  # the int8 engine and whether bfloat16 is native follow from it
# fbgemm sums int8 products pairwise in int16 unless the CPU has VNNI; without it, 7-bit
# activations keep those sums from overflowing.
VNNI = CPU.vnni


def needs_compiler(mode: str) -> bool:
    """Whether a mode compiles C++ (inductor): the compiled float modes."""
    return "compiled" in mode and not mode.startswith("int8")


def cpu_modes(kind: fast.CpuKind = CPU, compiler=True) -> tuple:
    """(the CPU modes a run times unless told, why others are left out): bfloat16 only where it is
    native, the compiled float modes only with a C++ compiler for inductor (fast.cpp_compiler);
    the compiled int8 mode is TorchScript, which needs none."""
    modes, notes = list(MODES["cpu"]), []
    if not kind.native_bf16:
        modes = [m for m in modes if not m.startswith("bfloat16")]
        notes.append("bfloat16 left out: not native on this CPU (no avx512_bf16 or amx_bf16)")
    if not compiler:
        modes = [m for m in modes if not needs_compiler(m)]
        notes.append("compiled float modes left out: no C++ compiler for torch.compile (g++)")
    return tuple(modes), notes


@dataclass
class BenchConfig:
    models: str = ""          # comma-separated Hub ids or folders; empty: presets + out/student
    dtypes: str = ""          # comma-separated: float32 bfloat16 int8 int8+cls float16; empty: all
    device: str = "auto"      # cpu, cuda, cuda:N, or auto: the CPU, and CUDA as well when present
    threads: int = 1          # CPU threads for the batch-1 pass (the paper: 1)
    limit: int = 0            # time the first N pairs only; 0: all
    data_dir: str = ""        # STS-B dev is looked for here; empty: $TINYDISTIL_DATA or ~/.cache
    tokenizer: str = ""       # a folder with tokenizer.json or vocab.txt for every model
    task: str = ""            # sst2: also the SST-2 dev accuracy of every mode (fine-tuned models)
    throughput: bool = False  # also examples/s at batch 1, 8, 32 of the last model, all CPU threads
    json: str = ""            # also write the rows to this file as a JSON list
    pretrain_step: bool = False  # instead: time distillation steps (see time_distillation_steps)
    batch_size: int = 16      # --pretrain-step: sequences per step, all full length
    seq_len: int = 128        # --pretrain-step: tokens per sequence
    steps: int = 4            # --pretrain-step: steps timed, after one untimed


# ----------------------------------------------------------------------------- inference rewrites

class FusedQKVAttention(nn.Module):
    """model.Attention with q, k, v as one (3H, H) Linear: one matmul instead of three (in int8, one
    quantisation of x instead of three). cls_only: the query of row 0 alone (its own Linear), so the
    output is (B, 1, H)."""

    def __init__(self, att: Attention, cls_only=False):
        super().__init__()
        self.n_head, self.out_lin, self.cls_only = att.n_head, att.out_lin, cls_only
        self.q_lin = att.q_lin if cls_only else None
        fused = [att.k_lin, att.v_lin] if cls_only else [att.q_lin, att.k_lin, att.v_lin]
        H = att.q_lin.in_features
        self.qkv = nn.Linear(H, H * len(fused)).to(att.q_lin.weight)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([lin.weight for lin in fused]))
            self.qkv.bias.copy_(torch.cat([lin.bias for lin in fused]))

    def split_heads(self, t, n):
        """(B, T, n * H) -> n tensors (B, nh, T, hs): the heads of q (and k, v) side by side."""
        B, T, nH = t.shape
        hs = nH // n // self.n_head
        return t.view(B, T, n, self.n_head, hs).permute(2, 0, 3, 1, 4)  # (n, B, nh, T, hs)

    def forward(self, x, mask):
        B, T, H = x.shape
        if self.cls_only:  # the [CLS] query alone: T = 1
            (q,) = self.split_heads(self.q_lin(x[:, :1]), 1)
            k, v = self.split_heads(self.qkv(x), 2)
        else:
            q, k, v = self.split_heads(self.qkv(x), 3)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T or 1, hs)
        return self.out_lin(y.transpose(1, 2).reshape(B, q.shape[2], H))  # (B, T or 1, H)


class CLSOnlyBlock(nn.Module):
    """The last model.Block for a [CLS] head: keys and values from every row, the rest on row 0."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        block.attention = FusedQKVAttention(block.attention, cls_only=True)

    def forward(self, x, mask):  # model.Block.forward (post-LN) on row 0; no dropout at inference
        b = self.block
        x = b.sa_layer_norm(x[:, :1] + b.attention(x, mask))  # (B, 1, H)
        return b.output_layer_norm(x + b.ffn(x))


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights, one scale per output row, run by the dynamic kernel of the
    quantized engine fastest on this CPU (fast.CpuKind.int8_engine): each call quantises x to 8
    bits over its range, sums products in int32, returns float32. Per-row weight scales and 8-bit
    (not torch's default 7-bit) activations keep it close to float32 on real checkpoints."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():  # torch marks its eager quantisation deprecated for torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, zero_points, 0, torch.qint8)
        with fast.quantized_engine(CPU.int8_engine):  # the packed weight keeps its engine
            self.packed = torch.ops.quantized.linear_prepack(qw, lin.bias.detach().float())

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, not VNNI)


def prepare(model: nn.Module, mode: str, device) -> nn.Module:
    """A copy of model (a BERT or a TaskModel) rewritten for inference in one mode: a dtype, then
    "+cls" (the last layer on [CLS] only) and "+compiled" (one graph: fast.compile_frozen)."""
    dtype, *options = mode.split("+")
    if "compiled" in options:  # int8's packed weights are opaque to torch.compile: TorchScript
        m = prepare(model, mode.replace("+compiled", ""), device)
        return fast.compile_frozen(m, script=dtype == "int8")
    m, cls_only = copy.deepcopy(model).eval(), "cls" in options
    for parent in list(m.modules()):
        if isinstance(parent, BERT) and cls_only:
            parent.layers[-1] = CLSOnlyBlock(parent.layers[-1])
        for name, child in parent.named_children():
            if isinstance(child, Attention):
                setattr(parent, name, FusedQKVAttention(child))
    if dtype != "int8":
        return m.to(device=device, dtype=getattr(torch, dtype))
    for parent in list(m.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return m


# ----------------------------------------------------------------------------- models and data

def load_model(name: str):
    """(encoder without MLM head, random_weights, note), as the paper counts parameters. Weights
    that cannot be had -> random weights, from the preset of that name or the folder's
    config.json."""
    try:
        folder = checkpoint_folder(name)
    except NoCheckpointFolder:
        raise
    except UserError as e:  # the Hub: offline, unreachable, or no such repo
        if name not in PRESETS:
            raise UserError(f"{e} (and {name!r} is not a preset: {', '.join(PRESETS)})") from None
        model = BERT(replace(BertConfig.preset(name), mlm_head=False)).eval()
        return model, True, f"weights unavailable ({e})"
    if not (folder / "model.safetensors").is_file():
        try:
            cfg = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{folder} has no model.safetensors and no readable config.json "
                            f"({e})") from None
        model = BERT(replace(cfg, mlm_head=False, pooler=cfg.model_type == "bert")).eval()
        model.source_dir = folder  # for its tokenizer
        return model, True, f"{folder / 'model.safetensors'} is missing"
    model, _ = BERT.from_pretrained(str(folder), return_unused=True)  # a task head is not timed
    return model.without_mlm_head(), False, ""


def tokenizer_for(model: BERT, cfg: BenchConfig):
    """(tokenizer, what): --tokenizer, else the checkpoint's own, else the shipped bert-base-uncased
    WordPiece vocabulary (the real one of both presets)."""
    src = model.source_dir
    own = src and any((Path(src) / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
    folder = cfg.tokenizer or (src if own else None)
    if folder is None:
        return data.load_tokenizer(STAND_IN), "the bert-base-uncased vocab in fixtures/bench"
    return data.load_tokenizer(folder), str(folder)


def load_pairs(cfg: BenchConfig):
    """([(sentence1, sentence2)], what): STS-B dev, else the shipped stand-in pairs."""
    try:
        examples = glue.load("stsb", "dev", cfg.data_dir or None)
        pairs, what = [(e.text_a, e.text_b) for e in examples], "STS-B dev"
    except UserError as e:
        lines = (STAND_IN / "stsb_like_pairs.tsv").read_text(encoding="utf-8").splitlines()[1:]
        pairs = [tuple(line.split("\t")) for line in lines]
        what = f"STAND-IN pairs of STS-B-like lengths (fixtures/bench), since {e}"
    return (pairs[:cfg.limit] if cfg.limit else pairs), what


def encode(tok, pairs, model: BERT, batch_size=1):
    """Model inputs, batch_size pairs per dict, padded to the longest of the batch. At batch size 1
    there is no padding, so no mask: SDPA then picks its fastest kernel."""
    max_len = min(MAX_LEN, model.config.max_position_embeddings)
    x = data.encode_batch(tok, [a for a, _ in pairs], [b for _, b in pairs], max_len)
    if int(x["input_ids"].max()) >= model.config.vocab_size:
        raise UserError(f"the tokenizer makes ids up to {int(x['input_ids'].max())} but the model "
                        f"has {model.config.vocab_size} embeddings: give it its own tokenizer "
                        f"with --tokenizer")
    keep = {"input_ids"}
    if batch_size > 1:
        keep.add("attention_mask")
    if model.config.type_vocab_size:  # the student has no token types
        keep.add("token_type_ids")
    lengths = x["attention_mask"].sum(1)
    batches = []
    for i in range(0, len(pairs), batch_size):
        T = int(lengths[i:i + batch_size].max())
        batches.append({k: v[i:i + batch_size, :T] if k in keep else None for k, v in x.items()})
    return batches


@dataclass
class Candidate:
    """One model of the run, loaded, with its tokenizer and its pairs encoded one per dict."""
    name: str
    model: BERT
    random_weights: bool
    tokenizer: object
    inputs: list


def load_candidate(name: str, pairs, cfg: BenchConfig) -> Candidate:
    """Load one model, encode the pairs with its tokenizer (timed), and say what was loaded."""
    model, random_weights, note = load_model(name)
    tok, tok_what = tokenizer_for(model, cfg)
    start = time.perf_counter()
    inputs = encode(tok, pairs, model)
    seconds = time.perf_counter() - start
    tokens_per_pair = sum(x["input_ids"].shape[1] for x in inputs) / len(inputs)
    weights = f", RANDOM WEIGHTS: {note}" if random_weights else ""
    print(f"{name}: {model.num_params() / 1e6:.1f}M parameters{weights}; tokeniser {tok_what}: "
          f"{seconds:.3f} s for {len(pairs)} pairs, {tokens_per_pair:.1f} tokens per pair")
    return Candidate(name, model, random_weights, tok, inputs)


def is_bert_base(cfg: BertConfig) -> bool:
    """Whether a model has BERT-base's shape, what the paper's speed-ups are relative to. Speed does
    not depend on the weights, so a local copy, bert-base-cased or random weights count too."""
    base = BertConfig.preset("bert-base-uncased")
    shape = ("model_type", "n_layer", "n_head", "hidden_size", "intermediate_size")
    return all(getattr(cfg, field) == getattr(base, field) for field in shape)


# ----------------------------------------------------------------------------- measurements

def warmup_inputs(inputs: list, n: int) -> list:
    """The first WARMUP inputs, then the first of each shape among the n timed ones not yet seen."""
    chosen = inputs[:WARMUP]
    seen = {x["input_ids"].shape for x in chosen}
    for x in inputs[WARMUP:n]:
        if x["input_ids"].shape not in seen:
            seen.add(x["input_ids"].shape)
            chosen.append(x)
    return chosen


def time_passes(runs: dict, n: int) -> dict:
    """{key: seconds of one pass over n examples} for runs {key: (model, device, inputs)}. Every
    example goes through every run in turn, each timed on its own (CUDA: synchronised), so a busy
    machine slows them all alike. Each run first sees, untimed, WARMUP examples and one example
    of every input shape: the first pass at a new length builds kernels' plans once per process
    (cuDNN's attention graphs, oneDNN's primitives, compiled graphs), a cost the run timed first
    at that length would pay alone. (Without this, on an H200, BERT-base in float16 and bfloat16
    took 22.8 ms a pair, 4x its float32 row, while DistilBERT, timed after it, took 2.6 ms.)"""
    seconds = dict.fromkeys(runs, 0.0)
    with torch.inference_mode():
        for model, _, inputs in runs.values():
            for x in warmup_inputs(inputs, n):
                model(**x, return_logits=False)
        for i in tqdm(range(n), desc="batch-1 passes", leave=False):
            for key, (model, device, inputs) in runs.items():
                start = time.perf_counter()
                model(**inputs[i], return_logits=False)
                if device.type == "cuda":  # kernels run asynchronously: wait for them
                    torch.cuda.synchronize(device)
                seconds[key] += time.perf_counter() - start
    return seconds


def sst2_accuracy(task_model, tok, examples, mode: str, device) -> float:
    """SST-2 dev accuracy of a fine-tuned TaskModel in one mode, a sentence at a time as the modes
    are timed: int8 quantises each call's activations over their range, which in a padded batch
    the other sentences (and the padding) would set."""
    model, correct = prepare(task_model, mode, device), 0
    with torch.inference_mode():
        for e in tqdm(examples, desc=f"sst2 {mode}", leave=False):
            x = data.encode_batch(tok, [e.text_a], max_len=MAX_LEN)
            pred = model(**{k: v.to(device) for k, v in x.items()}).argmax(-1).cpu()
            correct += int(pred[0]) == e.label
    return correct / len(examples)


def throughput(model, tok, pairs, mode: str) -> dict:
    """{batch size: examples/s} over (up to) 256 pairs in order, all CPU threads, after a first
    pass."""
    m, pairs, result = prepare(model, mode, "cpu"), pairs[:256], {}
    torch.set_num_threads(ALL_THREADS)
    for batch_size in (1, 8, 32):
        batches = encode(tok, pairs, model, batch_size)
        with torch.inference_mode():
            for _ in range(2):  # the first pass meets every shape's kernels; the second one counts
                start = time.perf_counter()
                for x in batches:
                    m(**x, return_logits=False)
        result[batch_size] = len(pairs) / (time.perf_counter() - start)
    return result


# ----------------------------------------------------------------------------- report

def speedup_base(candidates: list) -> tuple:
    """(model name, column label) of what the speed-ups are relative to: the first model of
    BERT-base's shape, as in the paper, else the run's first model, named in the column by the
    last two parts of its path or Hub id (a folder is often just "model" or "student")."""
    for c in candidates:
        if is_bert_base(c.model.config):
            return c.name, "BERT-base"
    first = candidates[0].name
    return first, "/".join(Path(first).parts[-2:])


CUDA_BATCH_1 = ("CUDA rows, batch size 1: launch-bound. A pair of ~30 tokens is a hundred or "
                "more small kernels whose launches from Python take longer than the GPU's work, so "
                "these times measure the host's launch speed more than the GPU (--throughput "
                "measures batches, on the CPU).")


def table(rows, n_pairs: int, pairs_what: str, threads: int, base: tuple) -> str:
    """Markdown in the layout of Table 3, the paper's rows first. Our speed-ups are over the float32
    row of base = (model name, label) on the same device; the paper's are over its BERT-base, so
    they are shown only when ours are over BERT-base too. The two columns before them are each CPU
    row's memory bound (add_memory_bound): the weights one pass reads, its time in floors."""
    base_name, label = base
    out = [f"Table 3. Ours: {n_pairs} pairs of {pairs_what.split(',')[0]}, batch size 1, CPU "
           f"{threads} thread(s), speed-up vs {base_name} float32. Paper: STS-B dev (1,500 pairs), "
           f"Xeon E5-2690 v3, 1 thread, speed-up vs BERT-base.", "",
           f"| Model | # param. (M) | Inf. time (s) | ms / example | weights / pass (MB) "
           f"| x memory floor | speed-up vs {label} |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, params_m, seconds in PAPER:
        speedup = f"{668 / seconds:.2f}x" if label == "BERT-base" else "-"
        out.append(f"| {name} (paper) | {params_m} | {seconds} | {1000 * seconds / 1500:.0f} | "
                   f"- | - | {speedup} |")
    base_seconds = {r["device"]: r["seconds"] for r in rows
                    if r["model"] == base_name and r["dtype"] == "float32"}
    for r in rows:
        name = f"{r['model']} {r['device']} {r['dtype']}"
        if r["random_weights"]:
            name += " (random weights)"
        if r.get("sst2_accuracy") is not None:
            name += f", SST-2 acc. {100 * r['sst2_accuracy']:.1f}"
        speedup = "-"
        if r["device"] in base_seconds:
            speedup = f"{base_seconds[r['device']] / r['seconds']:.2f}x"
        digits = 1 if r["params_m"] >= 1 else 3
        bound = ["-", "-"]
        if r.get("x_floor") is not None:
            bound = [f"{r['weight_mb']:.{digits}f}", f"{r['x_floor']:.1f}x"]
        out.append(f"| {name} | {r['params_m']:.{digits}f} | {r['seconds']:.2f} | "
                   f"{r['ms_per_example']:.2f} | {' | '.join(bound)} | {speedup} |")
    if any(r["device"].startswith("cuda") for r in rows):
        out += ["", CUDA_BATCH_1]
    return "\n".join(out)


def bars(rows, width=40) -> str:
    """ms per example as bars of unicode blocks (in eighths), the slowest row width characters."""
    names = [f"{r['model']} {r['device']} {r['dtype']}" for r in rows]
    top, lines = max(r["ms_per_example"] for r in rows), []
    for name, r in zip(names, rows):
        eighths = round(width * 8 * r["ms_per_example"] / top)
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        lines.append(f"{name.ljust(max(map(len, names)))}  {bar} {r['ms_per_example']:.1f} ms")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run

def check_config(cfg: BenchConfig):
    """(model names, devices, modes) of the run, every option checked before anything loads."""
    here = Path(__file__).resolve().parent
    student = [str(p) for p in [here / "out" / "student"] if p.is_dir()]
    names = [n.strip() for n in cfg.models.split(",") if n.strip()] or [*PRESETS, *student]
    missing = [n for n in names if looks_like_path(n) and not Path(n).expanduser().is_dir()]
    if missing:
        raise UserError(f"--models: no checkpoint folder {missing[0]}")
    if cfg.device != "auto":
        devices = [pick_device(cfg.device)]
    elif torch.cuda.is_available():  # Table 3 is on the CPU; the GPU is a bonus
        devices = [torch.device("cpu"), torch.device("cuda")]
    else:
        devices = [torch.device("cpu")]
    defaults = [m for d in devices for m in (
        cpu_modes(CPU, fast.cpp_compiler() is not None)[0] if d.type == "cpu" else MODES[d.type])]
    modes = [m.strip() for m in cfg.dtypes.split(",") if m.strip()] or list(dict.fromkeys(defaults))
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise UserError(f"--dtypes {','.join(unknown)}: the modes are {','.join(ALL_MODES)} "
                        f"(CPU: {','.join(MODES['cpu'])}; CUDA: {','.join(MODES['cuda'])})")
    if not any(m in MODES[d.type] for m in modes for d in devices):
        raise UserError(f"--dtypes {cfg.dtypes}: none of them runs on "
                        f"{' or '.join(str(d) for d in devices)}")
    if any(needs_compiler(m) for m in modes) and fast.cpp_compiler() is None:
        raise UserError(f"--dtypes {cfg.dtypes}: the compiled float modes need a C++ compiler "
                        f"for torch.compile (g++, clang++ or $CXX): install one or leave them out")
    if cfg.task not in ("", "sst2"):
        raise UserError(f"--task {cfg.task}: the only task is sst2 (or none)")
    if cfg.threads < 1 or cfg.limit < 0:
        raise UserError(f"--threads {cfg.threads}, --limit {cfg.limit}: use at least 1 thread "
                        f"and a limit of 0 (all pairs) or more")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        raise UserError(f"--tokenizer {cfg.tokenizer}: no such folder")
    if cfg.json and not Path(cfg.json).resolve().parent.is_dir():
        raise UserError(f"--json {cfg.json}: its folder does not exist")
    if cfg.json:  # a folder, or a read-only disk: before the timing, not after it
        check_output_file(cfg.json, "--json")
    return names, devices, modes


def build_runs(candidates, devices, modes) -> tuple:
    """({(name, device, mode): (prepared model, device, inputs on device)}, rows to fill)."""
    runs, rows = {}, []
    for c in candidates:
        for device in devices:
            on_device = [{k: v if v is None else v.to(device) for k, v in x.items()}
                         for x in c.inputs]
            for mode in [m for m in modes if m in MODES[device.type]]:
                model = prepare(c.model, mode, device)
                if hasattr(model, "compile_seconds"):
                    print(f"{c.name} {mode}: compiled in {model.compile_seconds:.1f} s")
                runs[c.name, str(device), mode] = (model, device, on_device)
                rows.append({"model": c.name, "device": str(device), "dtype": mode,
                             "params_m": round(c.model.num_params() / 1e6, 3),
                             "random_weights": c.random_weights})
    return runs, rows


def add_sst2_accuracy(rows, candidates, examples, cfg: BenchConfig):
    """The SST-2 dev accuracy of every row whose model has real (fine-tuned) weights."""
    task_models = {}
    for c in candidates:
        if not c.random_weights:
            task_model = TaskModel.from_pretrained(c.name)
            task_models[c.name] = (task_model, tokenizer_for(task_model.encoder, cfg)[0])
    for row in rows:
        task = task_models.get(row["model"])
        accuracy = None
        if task:
            accuracy = sst2_accuracy(*task, examples, row["dtype"], torch.device(row["device"]))
        row["sst2_accuracy"] = accuracy


def add_memory_bound(rows, candidates, bandwidth: float):
    """Each CPU row's bound: the megabytes of weights one pass reads (fast.pass_bytes), the time
    they take at the copy bandwidth measured in the run, and how many times that floor the row
    took. (CUDA rows: None; the bandwidth is the CPU's.)"""
    models = {c.name: c.model for c in candidates}
    for row in rows:
        n_bytes = fast.pass_bytes(models[row["model"]], row["dtype"])
        floor_ms = 1000 * fast.floor_seconds(n_bytes, bandwidth)
        on_cpu = row["device"] == "cpu"
        row.update(weight_mb=round(n_bytes / 1e6, 3) if on_cpu else None,
                   floor_ms=round(floor_ms, 6) if on_cpu else None,
                   x_floor=round(row["ms_per_example"] / floor_ms, 2) if on_cpu else None)


def print_throughput(candidate: Candidate, pairs, modes):
    print(f"\nthroughput of {candidate.name}: examples/s, {min(len(pairs), 256)} pairs, "
          f"{ALL_THREADS} CPU threads")
    for mode in [m for m in MODES["cpu"] if m in modes and "compiled" not in m]:
        per_batch = throughput(candidate.model, candidate.tokenizer, pairs, mode)
        print(f"  {mode:9s}" + "".join(f"  batch {bs}: {v:8.1f}" for bs, v in per_batch.items()))


# ----------------------------------------------------------------------------- distillation step

def check_step_options(cfg: BenchConfig) -> str:
    """--pretrain-step's options, before anything is built; returns the student's dtype."""
    dtype = cfg.dtypes or "float32"
    if dtype not in ("float32", "bfloat16") or min(cfg.batch_size, cfg.seq_len, cfg.steps) < 1:
        raise UserError("--pretrain-step takes --dtypes float32 or bfloat16 and positive "
                        "--batch-size, --seq-len and --steps")
    positions = BertConfig.preset("bert-base-uncased").max_position_embeddings
    if cfg.seq_len > positions:
        raise UserError(f"--seq-len {cfg.seq_len}: BERT-base takes at most {positions} tokens")
    return dtype


def time_distillation_steps(cfg: BenchConfig) -> dict:
    """Speed of pretraining (paper section 3): tinydistil's own step (mask on the host, copy,
    distillation_loss, backward, clip, AdamW) with a random-weight BERT-base teacher, its 6-layer
    student and random full-length batches, as the small recipe runs it (teacher in bfloat16 where
    native; float32 matmuls in TF32 on CUDA, as pretrain). One step is untimed. Prints and returns
    tokens/s, ms/step, MFU (against each model's dtype's measured peak, and against the bfloat16
    peak) and peak memory: the CUDA allocator's on a GPU, else the process's resident set."""
    dtype = check_step_options(cfg)
    device = pick_device(cfg.device)  # auto: the GPU when there is one
    tf32 = use_tf32(device)
    pcfg = tinydistil.resolve_recipe(tinydistil.PretrainConfig(dtype=dtype), 1, device)
    pcfg = tinydistil.resolve_losses(pcfg, mlm_head=True)  # the paper's loss: bert-base's head
    torch.manual_seed(0)
    teacher = BERT(BertConfig.preset("bert-base-uncased"))
    student, _ = tinydistil.init_student(teacher, 6, train_positions=False)
    dtypes = (DTYPES[pcfg.teacher_dtype], DTYPES[dtype])
    teacher.to(device, dtypes[0]).eval().requires_grad_(False)
    model = tinydistil.StudentForDistillation(student.to(device).train())
    opt = configure_optimizers(student, pcfg.lr, pcfg.weight_decay, betas=ADAMW_BETAS,
                               eps=ADAMW_EPS)
    V, first_word = teacher.config.vocab_size, 104  # ids below 104: [PAD], [unused*], specials
    probs = torch.ones(V)
    probs[:first_word] = 0
    mask_gen = torch.Generator().manual_seed(0)
    print(f"distillation step: BERT-base teacher ({pcfg.teacher_dtype}), 6-layer student "
          f"({dtype}), random weights, {cfg.batch_size} x {cfg.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, {device}" + (f"; {tf32}" if tf32 else ""))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(cfg.steps + 1):
        if step == 1:
            sync(device)
            t0 = time.perf_counter()
        ids = torch.randint(first_word, V, (cfg.batch_size, cfg.seq_len))
        mask = torch.ones_like(ids)
        ids, labels = mask_batch(ids, mask, probs, 103, V, mask_gen, pcfg.mlm_mask_prop)
        batch = tinydistil.to_device(ids, mask, labels, device)
        loss, _ = tinydistil.distillation_loss(teacher, model, batch, pcfg, dtypes)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), pcfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = (time.perf_counter() - t0) / cfg.steps
    tokens = cfg.batch_size * cfg.seq_len
    bf16 = (torch.bfloat16, torch.bfloat16)
    result = {"tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds,
              "mfu": step_mfu(teacher, student, dtypes, device, tokens, cfg.seq_len, seconds),
              "mfu_vs_bf16_peak": step_mfu(teacher, student, bf16, device, tokens, cfg.seq_len,
                                           seconds)}
    memory = peak_memory(result, device)
    mfu = "unknown (no native bfloat16)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    if result["mfu_vs_bf16_peak"] is not None and dtypes != bf16:
        mfu += f" ({100 * result['mfu_vs_bf16_peak']:.1f}% of the bfloat16 peak)"
    print(f"{result['tokens_per_s']:.0f} tokens/s | {result['ms_per_step']:.0f} ms/step | "
          f"MFU {mfu} | {memory}")
    return result


def peak_memory(result: dict, device: torch.device) -> str:
    """Adds the peak memory to result: the CUDA allocator's on a GPU, else the process's resident
    set; returns the words for the log line."""
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return f"peak memory {result['peak_gpu_mib']:.0f} MiB allocated on {device}"
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"peak memory {result['peak_rss_mib']:.0f} MiB resident"


def step_mfu(teacher, student, dtypes, device, tokens, seq_len, seconds):
    """Model FLOPs of a step over what the peaks would do in its time: the teacher forward (1x),
    the student forward and backward (3x), L_ce's head on every row. None if a peak is unknown.
    dtypes: the peaks' (teacher, student); a float32 peak on CUDA is TF32's (use_tf32)."""
    seconds_at_peak = 0.0
    for model, dtype, passes in ((teacher, dtypes[0], 1), (student, dtypes[1], 3)):
        peak = peak_flops(device, dtype)
        if peak is None:
            return None
        flops = passes * tokens * flops_per_token(model.config, seq_len, True)
        seconds_at_peak += flops / peak
    return min(1.0, seconds_at_peak / seconds)  # a peak measured under load can read low


# ----------------------------------------------------------------------------- the run

def run(cfg: BenchConfig) -> list:
    """Measure every model x device x mode; print the table, the chart (and throughput); return
    the rows. With --pretrain-step, time distillation steps instead."""
    if cfg.pretrain_step:
        return [time_distillation_steps(cfg)]
    names, devices, modes = check_config(cfg)
    sst2_dev = []
    if cfg.task:  # read before anything else, so a missing file stops the run at once
        sst2_dev = glue.load("sst2", "dev", cfg.data_dir or None)
    pairs, pairs_what = load_pairs(cfg)
    print(f"pairs: {len(pairs)} from {pairs_what}")
    print(f"CPU: {CPU.describe()}" + "".join(
        f"; {note}" for note in cpu_modes(CPU, fast.cpp_compiler() is not None)[1]
        if not cfg.dtypes))
    torch.set_num_threads(cfg.threads)
    candidates = [load_candidate(name, pairs, cfg) for name in names]
    runs, rows = build_runs(candidates, devices, modes)
    bandwidth = fast.copy_bandwidth()  # in the run, so under the load the passes see
    times = time_passes(runs, len(pairs))  # all runs together, example by example
    for row in rows:
        seconds = times[row["model"], row["device"], row["dtype"]]
        row.update(seconds=round(seconds, 6), ms_per_example=round(1000 * seconds / len(pairs), 4))
    add_memory_bound(rows, candidates, bandwidth)
    print(f"\nmemory bound: one thread copies {bandwidth / 1e9:.1f} GB/s (bytes read + written, "
          f"as STREAM's Copy); a batch-1 pass reads each layer weight once, at least "
          f"(weights / pass) / bandwidth")
    if cfg.task:
        add_sst2_accuracy(rows, candidates, sst2_dev, cfg)
    base = speedup_base(candidates)
    print("\n" + table(rows, len(pairs), pairs_what, cfg.threads, base) + "\n\n" + bars(rows))
    if cfg.throughput:
        print_throughput(candidates[-1], pairs, modes)
        torch.set_num_threads(cfg.threads)
    if cfg.json:
        atomic_write(cfg.json, json.dumps(rows, indent=2).encode())
    return rows


def main(argv=None):
    parser = build_parser(BenchConfig, "size and inference time, as the paper's Table 3 "
                                       "(see bench.py)")
    try:
        run(BenchConfig(**vars(parser.parse_args(argv))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a failing disk where no caller expected one: still one line
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
