"""bench.py: size and inference speed of BERT-base, DistilBERT and our students, as the paper's Table 3
(section 4.2, "Size and inference speed"), then the cheap CPU wins a deployment engineer would try.

    python bench.py                                        # BERT-base, DistilBERT (+ out/student), CPU, 1 thread
    python bench.py --models out/student --limit 200 --json bench.json
    python bench.py --models /tmp/minilm-sst2 --task sst2  # + SST-2 dev accuracy of every mode
    python bench.py --throughput                           # + examples/s at batch 1, 8, 32, all threads

Table 3 times "a full pass of GLUE task STS-B ... on CPU using a batch size of 1". So do we: every pair
of STS-B dev (from the data directory, else shipped stand-in pairs of STS-B-like lengths) is tokenised
first (timed on its own), then fed one at a time, unpadded, to every model and mode in turn, so a busy
machine slows them alike. Parameters are the encoder's (BertModel / DistilBertModel, no MLM head), as
the paper counts them. Speed does not depend on weight values, so a checkpoint that cannot be had
(offline, nothing cached) is built from its preset or config.json with random weights, said in the rows.

Modes: CPU float32, bfloat16 (weights and activations), int8 (every Linear: int8 weights, activations
quantised per call); CUDA float32, float16, bfloat16. "+cls" makes the last layer compute the [CLS] row
only, all an STS-B or SST-2 head reads. Every mode runs with q/k/v fused into one matmul. These are
inference-only rewrites of a loaded model, kept here so that model.py stays simple.
"""
import argparse
import copy
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from common import UserError
from hub import snapshot_download
from model import BERT, Attention, BertConfig, Transformer
from tasks import glue
from tasks.finetune import TaskModel

STAND_IN = Path(__file__).resolve().parent / "fixtures" / "bench"  # stand-in pairs; bert-base-uncased vocab.txt
PAPER = [("ELMo", 180, 895), ("BERT-base", 110, 668), ("DistilBERT", 66, 410)]  # Table 3: M params, seconds
PRESETS = ("bert-base-uncased", "distilbert-base-uncased")
MODES = {"cpu": ("float32", "bfloat16", "int8", "int8+cls"), "cuda": ("float32", "float16", "bfloat16")}
ALL_THREADS = torch.get_num_threads()  # before --threads: the throughput runs use them all
MAX_LEN = 128  # as in fine-tuning; the longest STS-B dev pair has 87 tokens
WARMUP = 10  # examples run before the clock starts
# fbgemm sums int8 products pairwise in int16 unless the CPU has VNNI; 7-bit activations avoid overflow there
VNNI = any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_vnni", "avx_vnni")) \
    if Path("/proc/cpuinfo").is_file() else False


@dataclass
class BenchConfig:
    models: str = ""          # comma-separated Hub ids or folders; "": the presets, + out/student if present
    dtypes: str = ""          # comma-separated modes (see MODES); "": all of the device's
    device: str = "auto"      # cpu, cuda, or auto: CPU, and CUDA as well when present
    threads: int = 1          # CPU threads for the batch-1 pass (the paper: 1)
    limit: int = 0            # time the first N pairs only; 0: all
    data_dir: str = ""        # "": $TINYDISTIL_DATA, else ~/.cache/tinydistil
    tokenizer: str = ""       # a folder with tokenizer.json or vocab.txt for every model (see tokenizer_for)
    task: str = ""            # "sst2": also the SST-2 dev accuracy of every mode (fine-tuned checkpoints)
    throughput: bool = False  # also examples/s at batch 1, 8, 32 of the last model, all CPU threads
    json: str = ""            # write the rows here as a JSON list


# ----------------------------------------------------------------------------- inference rewrites

class FusedQKVAttention(nn.Module):
    """model.Attention with q, k, v as one (3H, H) Linear: one matmul instead of three (in int8, one
    quantisation of x instead of three). cls_only: the query of row 0 alone (its own Linear), (B, 1, H) out."""

    def __init__(self, att: Attention, cls_only=False):
        super().__init__()
        self.n_head, self.out_lin, self.cls_only = att.n_head, att.out_lin, cls_only
        self.q_lin = att.q_lin if cls_only else None
        lins = (att.k_lin, att.v_lin) if cls_only else (att.q_lin, att.k_lin, att.v_lin)
        H = att.q_lin.in_features
        self.qkv = nn.Linear(H, H * len(lins)).to(att.q_lin.weight)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([lin.weight for lin in lins]))
            self.qkv.bias.copy_(torch.cat([lin.bias for lin in lins]))

    def forward(self, x, mask):
        B, T, H = x.shape
        heads = lambda t, n: t.view(B, t.shape[1], n, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)
        # heads(...) is n tensors (B, nh, T, hs); the [CLS] query has T = 1
        if self.cls_only:
            (q,), (k, v) = heads(self.q_lin(x[:, :1]), 1), heads(self.qkv(x), 2)
        else:
            q, k, v = heads(self.qkv(x), 3)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_lin(y.transpose(1, 2).reshape(B, q.shape[2], H))  # (B, T or 1, H)


class CLSOnlyBlock(nn.Module):
    """The last model.Block for a [CLS] head: keys and values from every row, the rest on row 0 only."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        block.attention = FusedQKVAttention(block.attention, cls_only=True)

    def forward(self, x, mask):  # model.Block.forward (post-LN) on row 0; dropout is off at inference
        b = self.block
        x = b.sa_layer_norm(x[:, :1] + b.attention(x, mask))
        return b.output_layer_norm(x + b.ffn(x))  # (B, 1, H)


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights, one scale per output row, run by fbgemm's dynamic kernel: each call
    quantises x to 8 bits over its range, sums products in int32, returns float32. Per-row weight scales
    and 8-bit (not torch's default 7-bit) activations keep it close to float32 on real checkpoints."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks its eager quantisation as deprecated for torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, lin.bias.detach().float())

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, not VNNI)


def prepare(model: nn.Module, mode: str, device: str) -> nn.Module:
    """A copy of model (a BERT or a TaskModel) rewritten for inference in one mode."""
    m, (dtype, _, cls) = copy.deepcopy(model).eval(), mode.partition("+")
    for parent in list(m.modules()):
        if isinstance(parent, Transformer) and cls:
            parent.layer[-1] = CLSOnlyBlock(parent.layer[-1])
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
    """(encoder without MLM head, random_weights, note). Weights that cannot be had -> random weights."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            folder = snapshot_download(name)
        except UserError as e:
            if name not in PRESETS:
                raise UserError(f"{e} (and {name!r} is neither a local folder nor a preset: "
                                f"{', '.join(PRESETS)})") from None
            model = BERT(replace(BertConfig.preset(name), mlm_head=False)).eval()
            return model, True, f"weights unavailable ({e})"
    if not (folder / "model.safetensors").is_file():
        try:
            cfg = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{folder} has no model.safetensors and no readable config.json ({e})") from None
        model = BERT(replace(cfg, mlm_head=False, pooler=cfg.model_type == "bert")).eval()
        model.source_dir = folder  # for its tokenizer
        return model, True, f"{folder / 'model.safetensors'} is missing"
    model, _ = BERT.from_pretrained(str(folder), return_unused=True)  # a task head is not timed
    for head in ("vocab_transform", "vocab_layer_norm", "vocab_projector"):
        model._modules.pop(head, None)
    model.config = replace(model.config, mlm_head=False)
    return model, False, ""


def tokenizer_for(model: BERT, cfg: BenchConfig):
    """(tokenizer, what): --tokenizer, else the checkpoint's own, else the shipped bert-base-uncased
    WordPiece vocabulary (the real one of both presets)."""
    src = model.source_dir
    own = src and any((Path(src) / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
    folder = cfg.tokenizer or (src if own else None)
    return data.load_tokenizer(folder or STAND_IN), str(folder or "the bert-base-uncased vocab in fixtures/bench")


def load_pairs(cfg: BenchConfig):
    """([(sentence1, sentence2)], what): STS-B dev, else the shipped stand-in pairs."""
    try:
        pairs, what = [(e.text_a, e.text_b) for e in glue.load("stsb", "dev", cfg.data_dir or None)], "STS-B dev"
    except UserError as e:
        lines = (STAND_IN / "stsb_like_pairs.tsv").read_text(encoding="utf-8").splitlines()[1:]
        pairs = [tuple(line.split("\t")) for line in lines]
        what = f"STAND-IN pairs of STS-B-like lengths (fixtures/bench), since {e}"
    return (pairs[:cfg.limit] if cfg.limit else pairs), what


def encode(tok, pairs, model: BERT, batch_size=1):
    """Model inputs, batch_size pairs per dict, padded to the longest of the batch (no mask at batch size 1)."""
    max_len = min(MAX_LEN, model.config.max_position_embeddings)
    x = data.encode_batch(tok, [a for a, _ in pairs], [b for _, b in pairs], max_len)
    if int(x["input_ids"].max()) >= model.config.vocab_size:
        raise UserError(f"the tokenizer makes ids up to {int(x['input_ids'].max())} but the model has "
                        f"{model.config.vocab_size} embeddings: give it its own tokenizer with --tokenizer")
    keep = {"input_ids"} | ({"attention_mask"} if batch_size > 1 else set()) \
        | ({"token_type_ids"} if model.config.type_vocab_size else set())  # the student has no token types
    lengths = x["attention_mask"].sum(1)
    return [{k: v[i:i + batch_size, :int(lengths[i:i + batch_size].max())] if k in keep else None
             for k, v in x.items()} for i in range(0, len(pairs), batch_size)]


# ----------------------------------------------------------------------------- measurements

def time_passes(runs: dict, n: int) -> dict:
    """{key: seconds of one pass over n examples} for runs {key: (model, device, inputs)}. Every example goes
    through every run in turn, each timed on its own (CUDA: synchronised), so a busy machine slows them all
    alike; each run first sees WARMUP examples untimed."""
    no_sync = lambda: None  # noqa: E731
    syncs = {k: torch.cuda.synchronize if device == "cuda" else no_sync for k, (_, device, _) in runs.items()}
    seconds = dict.fromkeys(runs, 0.0)
    with torch.inference_mode():
        for model, _, inputs in runs.values():
            for x in inputs[:WARMUP]:
                model(**x, logits=False)
        for i in tqdm(range(n), desc="batch-1 passes", leave=False):
            for key, (model, _, inputs) in runs.items():
                start = time.perf_counter()
                model(**inputs[i], logits=False)
                syncs[key]()
                seconds[key] += time.perf_counter() - start
    return seconds


def sst2_accuracy(task_model, tok, examples, mode: str, device: str) -> float:
    """SST-2 dev accuracy of a fine-tuned TaskModel in one mode (batches of 32, padded)."""
    model, correct = prepare(task_model, mode, device), 0
    with torch.inference_mode():
        for i in tqdm(range(0, len(examples), 32), desc=f"sst2 {mode}", leave=False):
            batch = examples[i:i + 32]
            x = data.encode_batch(tok, [e.text_a for e in batch], max_len=MAX_LEN)
            pred = model(**{k: v.to(device) for k, v in x.items()}).argmax(-1).cpu()
            correct += sum(int(p) == e.label for p, e in zip(pred, batch))
    return correct / len(examples)


def throughput(model, tok, pairs, mode: str) -> dict:
    """{batch size: examples/s} over (up to) 256 pairs in order, all CPU threads, after a first pass."""
    m, pairs, result = prepare(model, mode, "cpu"), pairs[:256], {}
    torch.set_num_threads(ALL_THREADS)
    for bs in (1, 8, 32):
        batches = encode(tok, pairs, model, bs)
        with torch.inference_mode():
            for _ in range(2):  # the first pass meets every shape's kernels; the second one counts
                start = time.perf_counter()
                for b in batches:
                    m(**b, logits=False)
        result[bs] = len(pairs) / (time.perf_counter() - start)
    return result


# ----------------------------------------------------------------------------- report

def table(rows, n_pairs: int, pairs_what: str, threads: int) -> str:
    """Markdown in the layout of Table 3, the paper's rows first. Our speed-ups are over BERT-base float32 on
    the same device (over the first model's float32 when BERT-base is not in the run)."""
    base = next((r["model"] for r in rows if r["model"] == "bert-base-uncased"), rows[0]["model"])
    out = [f"Table 3. Ours: {n_pairs} pairs of {pairs_what.split(',')[0]}, batch size 1, CPU {threads} thread(s), "
           f"speed-up vs {base} float32. Paper: STS-B dev (1,500 pairs), Xeon E5-2690 v3, 1 thread.", "",
           "| Model | # param. (M) | Inf. time (s) | ms / example | speed-up vs BERT-base |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {name} (paper) | {m} | {s} | {1000 * s / 1500:.0f} | {668 / s:.2f}x |" for name, m, s in PAPER]
    for r in rows:
        b = [b["seconds"] for b in rows if (b["model"], b["device"], b["dtype"]) == (base, r["device"], "float32")]
        name = f"{r['model']} {r['device']} {r['dtype']}" + " (random weights)" * r["random_weights"]
        if r.get("sst2_accuracy") is not None:
            name += f", SST-2 acc. {100 * r['sst2_accuracy']:.1f}"
        speedup = f"{b[0] / r['seconds']:.2f}x" if b else "-"
        out.append(f"| {name} | {r['params_m']:.{1 if r['params_m'] >= 1 else 3}f} | {r['seconds']:.2f} | "
                   f"{r['ms_per_example']:.2f} | {speedup} |")
    return "\n".join(out)


def bars(rows, width=40) -> str:
    """ms per example as bars of unicode blocks (in eighths), the slowest row width characters long."""
    names = [f"{r['model']} {r['device']} {r['dtype']}" for r in rows]
    top, lines = max(r["ms_per_example"] for r in rows), []
    for name, r in zip(names, rows):
        eighths = round(width * 8 * r["ms_per_example"] / top)
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        lines.append(f"{name.ljust(max(map(len, names)))}  {bar} {r['ms_per_example']:.1f} ms")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> list:
    """Measure every model x device x mode; print the table, the chart (and throughput); return the rows."""
    student = [str(p) for p in [Path(__file__).resolve().parent / "out" / "student"] if p.is_dir()]
    names = [n.strip() for n in cfg.models.split(",") if n.strip()] or [*PRESETS, *student]
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu"] + ["cuda"] * torch.cuda.is_available()}
    wanted = [m.strip() for m in cfg.dtypes.split(",") if m.strip()]
    if cfg.device not in devices or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {cfg.device!r}: use cpu, auto, or cuda on a machine that has one")
    if set(wanted) - set(MODES["cpu"] + MODES["cuda"]) or cfg.task not in ("", "sst2") or cfg.threads < 1 \
            or cfg.limit < 0:
        raise UserError(f"bad option: --dtypes takes {','.join(dict.fromkeys(MODES['cpu'] + MODES['cuda']))}; "
                        f"--task only sst2; --threads at least 1; --limit 0 or more")
    pairs, pairs_what = load_pairs(cfg)
    print(f"pairs: {len(pairs)} from {pairs_what}")
    torch.set_num_threads(cfg.threads)
    runs, rows, task_data = {}, [], {}
    for name in names:
        model, random_weights, note = load_model(name)
        tok, tok_what = tokenizer_for(model, cfg)
        start = time.perf_counter()
        inputs = encode(tok, pairs, model)
        tok_seconds, params_m = time.perf_counter() - start, model.num_params() / 1e6
        print(f"{name}: {params_m:.1f}M parameters{', RANDOM WEIGHTS: ' + note if random_weights else ''}; "
              f"tokeniser {tok_what}: {tok_seconds:.3f} s for {len(pairs)} pairs, "
              f"{sum(x['input_ids'].shape[1] for x in inputs) / len(inputs):.1f} tokens per pair")
        if cfg.task and not random_weights:
            task_model = TaskModel.from_pretrained(name)
            task_data[name] = (task_model, tokenizer_for(task_model.encoder, cfg)[0],
                               glue.load("sst2", "dev", cfg.data_dir or None))
        for device in devices[cfg.device]:
            on_device = [{k: v if v is None else v.to(device) for k, v in x.items()} for x in inputs]
            for mode in [m for m in MODES[device] if not wanted or m in wanted]:
                runs[name, device, mode] = (prepare(model, mode, device), device, on_device)
                rows.append({"model": name, "device": device, "dtype": mode, "params_m": round(params_m, 3),
                             "random_weights": random_weights})  # timed below, all runs together
    times = time_passes(runs, len(pairs))
    for row in rows:
        seconds = times[row["model"], row["device"], row["dtype"]]
        row.update(seconds=round(seconds, 6), ms_per_example=round(1000 * seconds / len(pairs), 4))
        if cfg.task:
            task = task_data.get(row["model"])
            row["sst2_accuracy"] = sst2_accuracy(*task, row["dtype"], row["device"]) if task else None
    print("\n" + table(rows, len(pairs), pairs_what, cfg.threads) + "\n\n" + bars(rows))
    if cfg.throughput:
        print(f"\nthroughput of {names[-1]}: examples/s, {min(len(pairs), 256)} pairs, {ALL_THREADS} CPU threads")
        for mode in [m for m in MODES["cpu"] if not wanted or m in wanted]:
            per_batch = throughput(model, tok, pairs, mode)
            print(f"  {mode:9s}" + "".join(f"  batch {bs}: {v:8.1f}" for bs, v in per_batch.items()))
        torch.set_num_threads(cfg.threads)
    if cfg.json:
        Path(cfg.json + ".tmp").write_text(json.dumps(rows, indent=2))
        os.replace(cfg.json + ".tmp", cfg.json)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="size and inference time, as the paper's Table 3 (see bench.py)")
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    try:
        run(BenchConfig(**vars(parser.parse_args(argv))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
