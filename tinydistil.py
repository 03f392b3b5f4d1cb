"""tinydistil.py: the command line. Distil a 6-layer student from BERT-base, fine-tune and score it.

    python tinydistil.py pretrain                          # distil bert-base-uncased on WikiText-2
    python tinydistil.py eval sst2 --model out/student     # fine-tune and score one task (or glue)
    python tinydistil.py report                            # Tables 1 and 2 beside the paper's
    python tinydistil.py fill-mask "the capital of france is [MASK] ." --model bert-base-uncased
    torchrun --nproc_per_node=2 tinydistil.py pretrain     # data-parallel over 2 processes

`pretrain` is the paper's section 2 (student architecture and initialisation, the triple loss
5 * L_ce + 2 * L_mlm + 1 * L_cos) and section 3 (dynamic masking, large batches, no NSP), following
the reference scripts (transformers examples/research_projects/distillation: train.py, distiller.py).
Every command's options are the fields of its config dataclass; `--help` lists them with defaults.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from common import UserError


# ----------------------------------------------------------------------------- pretraining

@dataclass
class PretrainConfig:
    teacher: str = "bert-base-uncased"   # Hub repo id or local folder of a BERT with MLM head
    out: str = "out/student"             # the student (DistilBERT layout) and its checkpoints
    data: str = "wikitext-2-raw"         # wikitext-2-raw, wikitext-2, or a text file / folder of .txt
    data_fraction: float = 0.1           # keep the first fraction of the training text
    data_dir: Optional[str] = None       # default $TINYDISTIL_DATA, else ~/.cache/tinydistil
    n_layer: int = 6                     # student depth; teacher layers spread evenly (see init_student)
    max_steps: Optional[int] = None      # optimizer steps, overrides --epochs; 0 saves the initial student
    epochs: int = 3                      # passes over the data, as the reference's n_epoch
    batch_size: int = 16                 # sequences per micro-batch and process
    seq_len: int = 128                   # longer texts are cut into chunks of this many tokens
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 5e-4
    warmup: float = 0.05                 # fraction of the steps with linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    alpha_ce: float = 5.0                # weight of the distillation loss over soft targets
    alpha_mlm: float = 2.0               # weight of the masked LM loss
    alpha_cos: float = 1.0               # weight of the hidden-state cosine loss
    temperature: float = 2.0             # softmax temperature of L_ce
    mlm_mask_prop: float = 0.15          # fraction of the tokens the MLM predicts
    mlm_smoothing: float = 0.7           # masking probability of a token is count ** -smoothing
    log_every: int = 10
    save_every: int = 500
    resume: bool = False                 # continue the run in --out from its last checkpoint
    seed: int = 56                       # the reference's seed
    device: str = "auto"                 # auto (cuda if present), cpu, cuda, cuda:1, ...
    dtype: str = "float32"               # float32 or bfloat16 (autocast) for the student
    teacher_dtype: str = "auto"          # auto: bfloat16 where the device runs it faster than float32
    benchmark: bool = False              # time steps on random weights and full-length random batches


def layer_map(n_teacher: int, n_student: int) -> list:
    """Which teacher layers initialise the student: evenly spaced from the first to the last,
    rounded. For 12 -> 6 this is the reference script's [0, 2, 4, 7, 9, 11] (the paper says
    "taking one layer out of two"; the released code keeps the first and last layer instead)."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"--n-layer {n_student}: the student needs 1 to {n_teacher} layers (the teacher's)")
    if n_student == 1:
        return [0]
    return [math.floor(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def init_student(teacher, n_layer: int):
    """Paper section 2, "Student initialization": a DistilBERT (no token types, no pooler) whose
    embeddings, layers and MLM head are copies of the teacher's."""
    from model import BERT
    if teacher.config.layer_norm_eps != 1e-12:  # DistilBERT's config.json cannot record another eps
        raise UserError(f"the teacher's LayerNorm eps is {teacher.config.layer_norm_eps}; a DistilBERT "
                        f"student (and its checkpoint) has 1e-12")
    cfg = dataclasses.replace(teacher.config, model_type="distilbert", n_layer=n_layer,
                              type_vocab_size=0, pooler=False, mlm_head=True)
    student = BERT(cfg)
    t_sd, layers = teacher.state_dict(), layer_map(teacher.config.n_layer, n_layer)
    new = {}
    for name in student.state_dict():
        if name.startswith("transformer.layer."):
            _, _, j, rest = name.split(".", 3)
            new[name] = t_sd[f"transformer.layer.{layers[int(j)]}.{rest}"]
        elif name in t_sd:  # embeddings and (when the teacher has one) the MLM head
            new[name] = t_sd[name]
    student.load_state_dict(new, strict=False)
    student.source_dir = teacher.source_dir  # so save_pretrained ships the teacher's tokenizer
    return student, layers


class Distillable(nn.Module):
    """The student's forward for distillation: MLM logits only on the rows the losses read (the
    vocabulary-sized head is a quarter of the student's FLOPs), hidden states of non-pad tokens.
    A module of its own so DistributedDataParallel sees every use of the weights in one forward."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, keep, logit_rows):
        h = self.student(input_ids, attention_mask, logits=False).hidden_states[-1][keep]  # (N, H)
        return (self.student.mlm_logits(h[logit_rows]) if logit_rows is not None else None), h


def measure_peak_flops(device, dtype, seconds=0.3):
    """FLOP/s of a large matmul: the denominator of MFU (no vendor table needed, CPU included)."""
    n = 2048 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    with torch.inference_mode():
        a @ b
        sync(device)
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(teacher_cfg, student_cfg, n_tokens, seq_len, ce: bool):
    """Model FLOPs of one step as (teacher, student): 2 per multiply-add; forward only for the
    teacher, forward + backward (3x) for the student; matmul weights plus attention's two (T x T)
    products; the vocabulary head only when L_ce needs it on every row."""
    def per_token(c):
        H, I = c.hidden_size, c.intermediate_size
        layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_len * H
        return c.n_layer * layer + (2 * (H * H + H * c.vocab_size) if ce else 0)
    return n_tokens * per_token(teacher_cfg), 3 * n_tokens * per_token(student_cfg)


def pretrain(cfg: PretrainConfig):
    from data import (Batches, collate, data_dir, load_corpus, load_tokenizer, mask_batch,
                      special_ids, token_probs)
    from losses import L_ce, L_cos, L_mlm, total_loss
    from model import BERT, BertConfig

    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)) if ddp else None)
    if ddp:
        if device.type == "cuda":  # NCCL and all_gather_object use the current device: one GPU per rank
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out = Path(cfg.out)
    if cfg.dtype not in ("float32", "bfloat16") or cfg.teacher_dtype not in ("auto", "float32", "bfloat16"):
        raise UserError("--dtype takes float32 or bfloat16; --teacher-dtype auto, float32 or bfloat16")
    if min(cfg.grad_accum, cfg.log_every, cfg.save_every, cfg.batch_size) < 1:
        raise UserError("--grad-accum, --log-every, --save-every and --batch-size must be at least 1")
    if min(cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos) < 0 or cfg.alpha_ce + cfg.alpha_mlm + cfg.alpha_cos == 0:
        raise UserError("the loss weights --alpha-ce/--alpha-mlm/--alpha-cos must be >= 0, not all 0")
    state = None if cfg.benchmark else check_out_dir(cfg, out, world)

    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed)
    if cfg.benchmark:
        teacher = BERT(BertConfig.preset("bert-base-uncased"))
        say("benchmark: random BERT-base teacher, full-length random batches, nothing saved")
    else:
        teacher = BERT.from_pretrained(cfg.teacher)
    if cfg.alpha_ce > 0 and not teacher.config.mlm_head:
        raise UserError(f"the teacher {cfg.teacher} has no MLM head, so there are no soft targets for "
                        f"L_ce: pass --alpha-ce 0 (and --alpha-mlm 0 to skip the untrained head)")
    if cfg.seq_len > teacher.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len}: the teacher has only "
                        f"{teacher.config.max_position_embeddings} positions")
    student, layers = init_student(teacher, cfg.n_layer)
    say(f"teacher {cfg.teacher}: {teacher.config.n_layer} layers, {teacher.num_params() / 1e6:.1f}M "
        f"params; student: layers {layers}, {student.num_params() / 1e6:.1f}M params")

    if cfg.benchmark:
        V, T = teacher.config.vocab_size, cfg.seq_len
        seqs, probs = None, torch.ones(V)
        probs[:104] = 0  # [PAD], [unused*], [UNK], [CLS], [SEP], [MASK] in BERT's vocabulary
        ids = {"pad": 0, "mask": 103}
        batches = Batches([T] * (cfg.batch_size * world * 4), cfg.batch_size, cfg.seed, rank, world)
    else:
        tok = load_tokenizer(teacher.source_dir)
        ids = special_ids(tok)
        load = lambda: load_corpus(cfg.data, tok, data_dir(cfg.data_dir), data_fraction=cfg.data_fraction,
                                   seq_len=cfg.seq_len)
        seqs = load() if master else None  # rank 0 tokenises and caches first; the others read the cache
        if ddp:
            torch.distributed.barrier()
        seqs = seqs if master else load()
        probs = token_probs(seqs, teacher.config.vocab_size, ids.values(), cfg.mlm_smoothing)
        batches = Batches(seqs.lengths, cfg.batch_size, cfg.seed, rank, world)
        say(f"data {cfg.data}: {seqs.stats['sequences']} sequences, {seqs.stats['tokens']} tokens, "
            f"{len(batches)} batches of {cfg.batch_size} per process and epoch")

    steps_per_epoch = max(1, len(batches) // cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if cfg.max_steps == 0:
        if master:
            student.save_pretrained(out)
        say(f"--max-steps 0: saved the initialised student to {out}")
        if ddp:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return student

    # The frozen teacher only gives targets: run it in bfloat16 where that is the faster matmul.
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    peaks = {dt: measure_peak_flops(device, dt) for dt in (torch.float32, torch.bfloat16)}
    # "auto" is decided by timing once and then saved, so a resumed run keeps the same targets.
    choice = state["teacher_dtype"] if state is not None else cfg.teacher_dtype
    t_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(choice) or \
        max(peaks, key=peaks.get)
    s_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    teacher.to(t_dtype)
    say(f"device {device}, student {cfg.dtype}, teacher {str(t_dtype)[6:]}; peak matmul "
        f"{peaks[torch.float32] / 1e9:.0f} GFLOP/s float32, {peaks[torch.bfloat16] / 1e9:.0f} bfloat16")

    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]  # biases and LayerNorm
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)  # one kernel over all tensors: on CPU the default loops, 8x slower
    warmup = math.ceil(cfg.warmup * total_steps)
    lr_at = lambda s: cfg.lr * (s / warmup if s < warmup else
                                max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    model = Distillable(student)
    if ddp:
        unused = cfg.alpha_ce == 0 and cfg.alpha_mlm == 0  # then the MLM head gets no gradient
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
    # Masking has its own stream, apart from dropout's (seeded with seed + rank above).
    gen = torch.Generator(device=device).manual_seed(1_000_003 * (cfg.seed + 1) + rank)
    step, epoch, position = 0, 0, 0
    if state is not None:
        step, (epoch, position) = state["step"], state["data_position"]
        opt.load_state_dict(state["optimizer"])
        student.load_state_dict(BERT.from_pretrained(str(state["dir"])).state_dict())
        torch.set_rng_state(state["rng"]["torch"][rank])
        if device.type == "cuda":  # dropout on the GPU draws from the device's generator
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], device)
        gen.set_state(state["rng"]["mask"][rank])
        say(f"resumed from {state['dir']} at step {step}")

    weights = {"ce": cfg.alpha_ce, "mlm": cfg.alpha_mlm, "cos": cfg.alpha_cos}
    stream = batches.stream(epoch, position)
    log_path = out / "train_log.jsonl"
    logged_at = step
    if state is not None and master and log_path.is_file():  # drop lines logged after the checkpoint
        lines = log_path.read_text().splitlines()
        log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    t0, tokens, busy = time.perf_counter(), 0, 0.0  # busy: seconds the work would take at peak
    while step < total_steps:
        sums = {k: 0.0 for k in ("loss", "ce", "mlm", "cos")}
        for micro in range(cfg.grad_accum):
            epoch, i, idx = next(stream)
            if cfg.benchmark:
                input_ids = torch.randint(104, V, (len(idx), T))
                attention_mask = torch.ones_like(input_ids)
            else:
                input_ids, attention_mask = collate(seqs, idx, ids["pad"])
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            input_ids, labels = mask_batch(input_ids, attention_mask, probs, ids["mask"],
                                           teacher.config.vocab_size, gen, cfg.mlm_mask_prop)
            keep = attention_mask.bool()
            labels = labels[keep]  # (N,) one per non-pad token
            with torch.no_grad(), torch.autocast(device.type, t_dtype, enabled=t_dtype != torch.float32):
                t_h = teacher(input_ids, attention_mask, logits=False).hidden_states[-1][keep]  # (N, H)
                t_logits = teacher.mlm_logits(t_h) if cfg.alpha_ce > 0 else None
            sel = labels != -100  # the MLM's predicted positions, about 15% of the rows
            # L_ce needs logits on every row; L_mlm alone only on the predicted ones.
            rows = (slice(None) if cfg.alpha_ce > 0 else sel) if cfg.alpha_ce + cfg.alpha_mlm > 0 else None
            sync_now = not ddp or micro == cfg.grad_accum - 1
            ctx = model.no_sync() if not sync_now else torch.enable_grad()
            with ctx:
                with torch.autocast(device.type, s_dtype, enabled=s_dtype != torch.float32):
                    s_logits, s_h = model(input_ids, attention_mask, keep, rows)
                terms = {}
                if cfg.alpha_ce > 0:
                    terms["ce"] = L_ce(s_logits, t_logits, cfg.temperature)
                if cfg.alpha_mlm > 0:
                    terms["mlm"] = L_mlm(s_logits[sel] if cfg.alpha_ce > 0 else s_logits, labels[sel])
                if cfg.alpha_cos > 0:
                    terms["cos"] = L_cos(s_h, t_h.float())
                loss = total_loss(terms, weights)
                (loss / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] += v.item() / cfg.grad_accum
            sums["loss"] += loss.item() / cfg.grad_accum
            n = int(keep.sum())
            tokens += n * world
            f_t, f_s = step_flops(teacher.config, student.config, n, input_ids.shape[1], cfg.alpha_ce > 0)
            busy += f_t / peaks[t_dtype] + f_s / peaks[s_dtype]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        grad_norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            sync(device)
            dt = time.perf_counter() - t0
            n_steps = step - logged_at
            mfu = busy / dt  # each process measured its own peak, so no factor of world
            rec = {"step": step, "loss": sums["loss"], "loss_ce": sums["ce"], "loss_mlm": sums["mlm"],
                   "loss_cos": sums["cos"], "lr": lr_at(step - 1), "grad_norm": grad_norm,
                   "ms": 1000 * dt / n_steps, "tokens_per_s": tokens / dt, "mfu": mfu}
            say(f"step {step:5d}/{total_steps} | loss {rec['loss']:.4f} | ce {rec['loss_ce']:.4f} | "
                f"mlm {rec['loss_mlm']:.4f} | cos {rec['loss_cos']:.4f} | lr {rec['lr']:.2e} | "
                f"grad norm {grad_norm:.3f} | {rec['ms']:.0f} ms | {rec['tokens_per_s']:.0f} tokens/s | "
                f"MFU {100 * mfu:.1f}%")
            if master and not cfg.benchmark:
                out.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            t0, tokens, busy, logged_at = time.perf_counter(), 0, 0.0, step
        if not cfg.benchmark and (step % cfg.save_every == 0 or step == total_steps):
            t_save = time.perf_counter()
            save_checkpoint(cfg, out, student, opt, step, (epoch, i + 1), gen, ddp, master, world,
                            str(t_dtype).removeprefix("torch."))
            t0 += time.perf_counter() - t_save  # the log's speed is the training's, not the disk's
    if cfg.benchmark:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cuda_mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0
        say(f"peak memory: {rss:.0f} MiB resident" + (f", {cuda_mem:.0f} MiB CUDA" if cuda_mem else ""))
    if ddp:  # rank 0 may still be saving; tearing gloo down under it aborts the other ranks
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return student


def resolve_device(name: str, local_rank=None) -> torch.device:
    """--device as a torch.device; under torchrun a bare "cuda" means this process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None


# Options that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = {"resume", "log_every", "save_every", "device", "data_dir"}


def check_out_dir(cfg, out: Path, world: int):
    """Refuse to overwrite a run; on --resume load its last complete checkpoint's state."""
    latest = out / "checkpoints" / "latest"
    if not cfg.resume:
        if latest.is_file():
            raise UserError(f"{out} already holds a run (checkpoint {latest.read_text().strip()}): "
                            f"pass --resume to continue it, or choose another --out")
        return None
    if not latest.is_file():
        raise UserError(f"--resume: {out} has no complete checkpoint to continue from")
    ckpt = out / "checkpoints" / latest.read_text().strip()
    try:
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"--resume: cannot read {ckpt / 'train_state.pt'} ({e})") from None
    saved = state["config"]
    if len(state["rng"]["torch"]) != world:
        raise UserError(f"--resume: {out} was trained by {len(state['rng']['torch'])} processes, "
                        f"this run has {world}: resume with the same number")
    diff = [k for k, v in asdict(cfg).items() if k not in RESUME_FREE and saved.get(k) != v]
    if diff:
        raise UserError(f"--resume: {out} was trained with other settings ("
                        + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} not {getattr(cfg, k)}"
                                    for k in diff) + "): pass the same arguments")
    return {**state, "dir": ckpt}


def save_checkpoint(cfg, out, student, opt, step, position, gen, ddp, master, world, teacher_dtype):
    """checkpoints/step-N/ (the student + train_state.pt) is written under a temporary name and
    renamed when complete, then checkpoints/latest points at it: a kill at any moment leaves the
    previous checkpoint whole. The student is also saved at the top of --out for `eval`."""
    rng = {"torch": [torch.get_rng_state()], "mask": [gen.get_state()],
           "cuda": [torch.cuda.get_rng_state(gen.device) if gen.device.type == "cuda" else None]}
    if ddp:  # every rank has its own dropout and masking streams
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
        rng = {k: [g[k][0] for g in gathered] for k in rng}
    if not master:
        return
    ckpts = out / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    torch.save({"step": step, "data_position": position, "optimizer": opt.state_dict(),
                "rng": rng, "config": asdict(cfg), "teacher_dtype": teacher_dtype}, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (ckpts / "latest.tmp").write_text(final.name)
    os.replace(ckpts / "latest.tmp", ckpts / "latest")
    for old in ckpts.glob("step-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    student.save_pretrained(out)


# ----------------------------------------------------------------------------- fill-mask

@dataclass
class FillMaskConfig:
    text: str = "the capital of france is [MASK] ."
    model: str = "bert-base-uncased"  # Hub repo id or local folder
    top_k: int = 5


def fill_mask(cfg: FillMaskConfig):
    """Top-k predictions for each [MASK]: the first check that a teacher loaded right."""
    from data import load_tokenizer, special_ids
    from model import BERT
    model = BERT.from_pretrained(cfg.model)
    if not model.config.mlm_head:
        raise UserError(f"{cfg.model} has no MLM head (a bare encoder): fill-mask needs one")
    tok = load_tokenizer(model.source_dir)
    enc = tok.encode(cfg.text)
    ids = torch.tensor([enc.ids])
    where = (ids[0] == special_ids(tok)["mask"]).nonzero().flatten().tolist()
    if not where:
        raise UserError(f"no [MASK] token in {cfg.text!r}")
    with torch.no_grad():
        probs = model(ids).logits[0].softmax(-1)  # (T, V)
    for pos in where:
        p, top = probs[pos].topk(cfg.top_k)
        print(f"[MASK] at token {pos}:")
        for pi, ti in zip(p.tolist(), top.tolist()):
            print(f"  {pi:.4f}  {tok.id_to_token(ti)}")


# ----------------------------------------------------------------------------- report

@dataclass
class ReportConfig:
    results: str = "results.jsonl"  # what `eval` appended to
    teacher: Optional[str] = None   # the model the retention is relative to (default: see tasks/report.py)


def report(cfg: ReportConfig):
    from tasks.report import render
    print(render(cfg.results, cfg.teacher))


# ----------------------------------------------------------------------------- argparse

def add_dataclass_args(parser, cls, positional=()):
    """One option per field, default and type from the dataclass, help from its trailing comment."""
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.+)$", inspect.getsource(cls), re.M))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
        help_ = f"{comments.get(f.name, '')} (default: {f.default})".strip()
        if f.name in positional:
            parser.add_argument(f.name, type=kind, nargs="?" if f.default is not None else None,
                                default=f.default, help=help_)
        elif kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=f.default, help=comments.get(f.name))
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                                help=help_, metavar=f.name.upper())


def main(argv=None):
    from tasks.finetune import EvalConfig, run
    commands = {  # name -> (config dataclass, positional fields, function, one-line help)
        "pretrain": (PretrainConfig, (), pretrain, "distil a student from a BERT teacher"),
        "eval": (EvalConfig, ("task",), run, "fine-tune and score a model on a task (or glue)"),
        "report": (ReportConfig, (), report, "render the paper's Tables 1 and 2 from the results"),
        "fill-mask": (FillMaskConfig, ("text",), fill_mask, "top predictions for [MASK] tokens"),
    }
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, positional, _, help_) in commands.items():
        add_dataclass_args(sub.add_parser(name, help=help_, description=help_), cls, positional)
    args = vars(parser.parse_args(argv))
    cls, _, fn, _ = commands[args.pop("command")]
    try:
        fn(cls(**args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
