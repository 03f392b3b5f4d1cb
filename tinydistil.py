"""tinydistil.py: the command line. Distil a 6-layer student from BERT-base, fine-tune and score it.

    python tinydistil.py pretrain                          # distil bert-base-uncased on WikiText-2
    python tinydistil.py pretrain --recipe paper           # the reference's batch, length, targets
    python tinydistil.py eval sst2 --model out/student     # fine-tune and score one task (or glue)
    python tinydistil.py report                            # Tables 1 and 2 beside the paper's
    python tinydistil.py fill-mask "the capital of france is [MASK] ." --model bert-base-uncased
    torchrun --nproc_per_node=2 tinydistil.py pretrain     # data-parallel over 2 processes

`pretrain` is the paper's section 2 (student architecture and initialisation, the triple loss
5 * L_ce + 2 * L_mlm + 1 * L_cos) and section 3 (dynamic masking, large batches, no NSP), following
the reference scripts (transformers examples/research_projects/distillation: train.py and
distiller.py).
Read it top to bottom: the config and its two recipes, the student's initialisation, the loss of one
batch, the checkpoints, then `pretrain` itself. Every command's options are the fields of its config
dataclass; `--help` lists them with defaults.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from common import (UserError, add_dataclass_args, atomic_write, has_bfloat16_matmul, lr_factor,
                    pick_device, sync, warmup_steps)


# ----------------------------------------------------------------------------- config and recipes

@dataclass
class PretrainConfig:
    teacher: str = "bert-base-uncased"   # Hub repo id or local folder of a BERT with MLM head
    out: str = "out/student"             # the student (DistilBERT layout) and its checkpoints
    recipe: str = "small"                # small (a laptop, minutes) or paper (the reference's)
    data: str = "wikitext-2-raw"         # wikitext-2[-raw], -103[-raw], .txt/.jsonl file or folder
    data_fraction: Optional[float] = None  # keep the first fraction of the text; None: the recipe's
    data_dir: Optional[str] = None       # default $TINYDISTIL_DATA, else ~/.cache/tinydistil
    n_layer: int = 6                     # student depth; teacher layers spread evenly (layer_map)
    student_init: str = "teacher"        # teacher: copy its layers (paper); random: reference init
    train_positions: bool = False        # the reference freezes the position embeddings (see init)
    max_steps: Optional[int] = None      # optimizer steps, overrides --epochs; 0: save the initial
    epochs: Optional[int] = None         # passes over the data; None: the recipe's
    batch_size: Optional[int] = None     # sequences per micro-batch and process; None: the recipe's
    grad_accum: Optional[int] = None     # micro-batches per optimizer step; None: the recipe's
    seq_len: Optional[int] = None        # longer texts are cut into chunks of this many tokens
    lr: Optional[float] = None           # peak learning rate; None: the recipe's
    warmup: float = 0.05                 # fraction of the steps with linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    # The loss fields left at None come from LOSSES: by whether the teacher has an MLM head.
    alpha_ce: Optional[float] = None     # weight of L_ce, soft targets (LOSSES: 5; head-less 0)
    alpha_mlm: Optional[float] = None    # weight of L_mlm, masked LM (LOSSES: 2; head-less 0)
    alpha_cos: Optional[float] = None    # weight of L_cos, last hidden state (LOSSES: 1)
    alpha_hid: Optional[float] = None    # weight of L_hid, the layers below the last (LOSSES: 0)
    alpha_pool: Optional[float] = None   # weight of L_pool, mean-pooled embedding (LOSSES: 0)
    temperature: float = 2.0             # softmax temperature of L_ce
    mlm_mask_prop: Optional[float] = None  # fraction masked, 0: clean (LOSSES: 0.15; head-less 0)
    mlm_smoothing: float = 0.7           # masking probability of a token is count ** -smoothing
    teacher_dtype: Optional[str] = None  # float32, bfloat16, auto (bf16 if native); None: recipe
    dtype: str = "float32"               # float32 or bfloat16 (autocast) for the student
    log_every: int = 10                  # optimizer steps between two log lines
    save_every: Optional[int] = None     # steps between checkpoints; None: 5 per run
    resume: bool = False                 # continue the run in --out from its last checkpoint
    overwrite: bool = False              # replace an earlier tinydistil run in --out
    seed: int = 56                       # the reference's seed
    device: str = "auto"                 # auto (cuda if present), cpu, cuda, cuda:1, ...


# What a field left at None becomes. "paper" is the reference's training_configs + train.py: 2,000
# sequences per update (5 per GPU x 50 accumulation steps x 8 GPUs), up to 512 tokens, lr 5e-4,
# 3 epochs, float32 soft targets. "small" fits a laptop; studies/retention.md measured its choices,
# and studies/teacher_precision.md its teacher: bfloat16 moves the targets 4-5 orders of magnitude
# less than the losses and runs 3.5x faster where the hardware has it (and 3.4x slower where not).
RECIPES = {
    "small": dict(data_fraction=0.1, epochs=3, batch_size=16, grad_accum=1, seq_len=128, lr=5e-4,
                  teacher_dtype="auto"),
    "paper": dict(data_fraction=1.0, epochs=3, batch_size=5, grad_accum=None, seq_len=512, lr=5e-4,
                  teacher_dtype="float32"),
}
PAPER_SEQUENCES_PER_STEP = 2000  # paper recipe: grad_accum = this / (batch_size x processes)

# What a loss field left at None becomes: the teacher decides. With an MLM head (bert-base-uncased)
# the paper's triple loss 5 * L_ce + 2 * L_mlm + 1 * L_cos on 15% masked tokens. Without one (a
# sentence encoder: MiniLM, e5, bge, ...) L_ce has no soft targets, and L_mlm would train a fresh
# head whose gradients pull the encoder away from the teacher. studies/retention_sts.md measured
# what a 3-layer MiniLM student keeps of zero-shot STS-B (teacher 86.72, truncation 79.63): with
# 2 L_mlm + 1 L_cos 69.09, with L_cos alone 83.5-83.6, and neither masking, L_hid nor L_pool move
# it further; so L_cos alone, on clean text: masking serves only L_ce and L_mlm. What is left is
# the corpus, not the loss: the same recipe on STS-B's own training sentences reaches 86.45.
LOSSES = {
    "mlm head": dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_hid=0.0, alpha_pool=0.0,
                     mlm_mask_prop=0.15),
    "no mlm head": dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_hid=0.0, alpha_pool=0.0,
                        mlm_mask_prop=0.0),
}


def resolve_recipe(cfg: PretrainConfig, world: int, device: torch.device) -> PretrainConfig:
    """Fill the fields left at None from the recipe; a field given on the command line wins. The
    resolved values are what the run logs, saves, and compares on --resume."""
    if cfg.recipe not in RECIPES:
        raise UserError(f"--recipe {cfg.recipe}: use {' or '.join(RECIPES)}")
    filled = {k: v for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) is None}
    cfg = replace(cfg, **filled)
    if cfg.grad_accum is None:
        per_micro_step = cfg.batch_size * world
        cfg = replace(cfg, grad_accum=max(1, round(PAPER_SEQUENCES_PER_STEP / per_micro_step)))
    if cfg.teacher_dtype == "auto":
        cfg = replace(cfg, teacher_dtype="bfloat16" if has_bfloat16_matmul(device) else "float32")
    return cfg


def resolve_losses(cfg: PretrainConfig, mlm_head: bool) -> PretrainConfig:
    """Fill the loss fields left at None from LOSSES, by whether the teacher has an MLM head; a
    weight given on the command line wins, and is then checked."""
    if not mlm_head and cfg.alpha_ce:
        raise UserError(f"--alpha-ce {cfg.alpha_ce}: the teacher {cfg.teacher} has no MLM head, so "
                        f"L_ce has no soft targets; leave --alpha-ce out (the head-less default) "
                        f"or give the teacher a head first")
    defaults = LOSSES["mlm head" if mlm_head else "no mlm head"]
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    weights = (cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos, cfg.alpha_hid, cfg.alpha_pool)
    rules = [
        (min(weights) >= 0 and sum(weights) > 0,
         "the loss weights --alpha-ce/-mlm/-cos/-hid/-pool must be >= 0, not all 0"),
        (0 <= cfg.mlm_mask_prop < 1,
         f"--mlm-mask-prop {cfg.mlm_mask_prop}: give a fraction in [0, 1)"),
        (cfg.mlm_mask_prop > 0 or cfg.alpha_mlm == 0,
         "--mlm-mask-prop 0 masks nothing, so L_mlm has nothing to predict: give a fraction "
         "(0.15 as BERT) or --alpha-mlm 0"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    return cfg


def check_config(cfg: PretrainConfig):
    """Every setting that can be judged before anything loads: one line for the first wrong one."""
    rules = [
        (cfg.lr > 0, f"--lr {cfg.lr}: the learning rate must be positive"),
        (cfg.max_steps is None or cfg.max_steps >= 0,
         f"--max-steps {cfg.max_steps}: give 0 or more"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: give at least 1 (or --max-steps)"),
        (min(cfg.batch_size, cfg.grad_accum, cfg.log_every) >= 1,
         "--batch-size, --grad-accum and --log-every must be at least 1"),
        (cfg.save_every is None or cfg.save_every >= 1, "--save-every must be at least 1"),
        (0 < cfg.data_fraction <= 1,
         f"--data-fraction {cfg.data_fraction}: give a number in (0, 1]"),
        (cfg.seq_len >= 12, f"--seq-len {cfg.seq_len}: sequences under 12 tokens are dropped"),
        (cfg.n_layer >= 1, f"--n-layer {cfg.n_layer}: the student needs at least 1 layer"),
        (cfg.temperature > 0, f"--temperature {cfg.temperature}: must be positive"),
        (0 <= cfg.warmup < 1, f"--warmup {cfg.warmup}: give a fraction in [0, 1)"),
        (cfg.weight_decay >= 0 and cfg.max_grad_norm > 0,
         "--weight-decay must be >= 0 and --max-grad-norm positive"),
        (cfg.dtype in ("float32", "bfloat16") and cfg.teacher_dtype in ("float32", "bfloat16"),
         "--dtype and --teacher-dtype take float32 or bfloat16"),
        (cfg.student_init in ("teacher", "random"), "--student-init takes teacher or random"),
        (not (cfg.resume and cfg.overwrite), "--resume continues a run, --overwrite replaces it: "
                                             "give one of them"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def describe_losses(cfg: PretrainConfig, mlm_head: bool = True) -> str:
    """The loss part of the first log line: its terms, their weights, and the masking."""
    terms = [f"{w:g} {name}" for w, name in ((cfg.alpha_ce, "L_ce"), (cfg.alpha_mlm, "L_mlm"),
                                            (cfg.alpha_cos, "L_cos"), (cfg.alpha_hid, "L_hid"),
                                            (cfg.alpha_pool, "L_pool")) if w > 0]
    masking = (f"{cfg.mlm_mask_prop:.0%} of the tokens masked" if cfg.mlm_mask_prop > 0
               else "unmasked input")
    line = f"loss {' + '.join(terms)}, {masking}"
    if not mlm_head:
        line += " (the teacher has no MLM head: LOSSES['no mlm head'] for the weights not given)"
    return line


def describe_recipe(cfg: PretrainConfig, world: int, mlm_head: bool = True) -> str:
    """The first log line: what runs, and how it differs from the reference."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    line = (f"recipe {cfg.recipe}: {per_step} sequences per step ({cfg.batch_size} x "
            f"{cfg.grad_accum} accumulated x {world} processes) of up to {cfg.seq_len} tokens, "
            f"lr {cfg.lr:g}, {cfg.epochs} epochs of {cfg.data_fraction:g} of {cfg.data}, "
            f"{cfg.teacher_dtype} teacher; {describe_losses(cfg, mlm_head)}")
    if cfg.recipe == "small":
        line += (f"; the reference: {PAPER_SEQUENCES_PER_STEP} sequences of up to 512 tokens, "
                 f"float32 teacher, on Wikipedia + BookCorpus (--recipe paper)")
    return line


# ------------------------------------------------------------------------ the student (section 2)

def layer_map(n_teacher: int, n_student: int) -> list:
    """Which teacher layers initialise the student: evenly spaced from the first to the last,
    rounded. For 12 -> 6 this is the reference script's [0, 2, 4, 7, 9, 11] (the paper says
    "taking one layer out of two"; the released code keeps the first and last layer instead)."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"--n-layer {n_student}: the student needs 1 to {n_teacher} layers "
                        f"(the teacher's)")
    if n_student == 1:
        return [0]
    return [math.floor(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def init_student(teacher, n_layer: int, how: str = "teacher", train_positions: bool = True):
    """Paper section 2, "Student initialization": a DistilBERT (no token types, no pooler, half the
    layers) whose embeddings, layers and MLM head are copies of the teacher's (how="teacher"), or
    the reference's random init (how="random": N(0, 0.02), sinusoidal positions) for Table 4.

    The reference student config sets sinusoidal_pos_embds, which makes the position table
    requires_grad=False; the teacher's positions are then loaded into it, so they stay frozen during
    distillation. train_positions=False does the same. Returns (student, teacher layers used)."""
    from model import BERT
    if teacher.config.layer_norm_eps != 1e-12:  # DistilBERT's config.json cannot record another eps
        raise UserError(f"the teacher's LayerNorm eps is {teacher.config.layer_norm_eps}; a "
                        f"DistilBERT student (and its checkpoint) has 1e-12")
    cfg = replace(teacher.config, model_type="distilbert", n_layer=n_layer, type_vocab_size=0,
                  pooler=False, mlm_head=True)
    student, layers = BERT(cfg), layer_map(teacher.config.n_layer, n_layer)
    copies = []  # (student module, teacher module) pairs with the same parameters
    if how == "teacher":
        t_emb, s_emb = teacher.embeddings, student.embeddings
        copies += [(s_emb.word_embeddings, t_emb.word_embeddings),
                   (s_emb.position_embeddings, t_emb.position_embeddings),
                   (s_emb.LayerNorm, t_emb.LayerNorm)]
        copies += [(student.layers[j], teacher.layers[i]) for j, i in enumerate(layers)]
        if teacher.config.mlm_head:  # a sentence encoder has none: the student's head starts fresh
            copies += [(student.vocab_transform, teacher.vocab_transform),
                       (student.vocab_layer_norm, teacher.vocab_layer_norm)]
            with torch.no_grad():
                student.vocab_projector.bias.copy_(teacher.vocab_projector.bias)
    else:
        with torch.no_grad():
            student.embeddings.position_embeddings.weight.copy_(sinusoidal_positions(cfg))
    for mine, theirs in copies:
        mine.load_state_dict(theirs.state_dict())
    student.embeddings.position_embeddings.requires_grad_(train_positions)
    student.source_dir = teacher.source_dir  # so save_pretrained ships the teacher's tokenizer
    return student, layers


def sinusoidal_positions(cfg) -> torch.Tensor:
    """DistilBERT's create_sinusoidal_embeddings: sin on even, cos on odd dimensions. (P, H)"""
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None]  # (P, 1)
    j = torch.arange(cfg.hidden_size, dtype=torch.float64)[None, :]  # (1, H)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / cfg.hidden_size)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


class StudentForDistillation(nn.Module):
    """The student's forward during distillation: the hidden states of every layer, (B, T, H) each,
    and MLM logits only on the rows a loss reads. A module of its own so DistributedDataParallel
    sees every use of the weights inside one forward."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, real, logit_rows):
        states = self.student(input_ids, attention_mask, return_logits=False).hidden_states
        hidden = states[-1][real]  # (N, H): padding is not text, no loss reads it
        logits = self.student.mlm_logits(hidden[logit_rows]) if logit_rows is not None else None
        return states, logits  # logits (rows, V)


# ------------------------------------------------------------------------ the loss of one batch

def distillation_loss(teacher, student, input_ids, attention_mask, labels, cfg, dtypes):
    """The paper's training loss on one masked micro-batch: alpha_ce * L_ce + alpha_mlm * L_mlm
    + alpha_cos * L_cos (5, 2, 1), every term over the N real (non-pad) tokens; and two terms for
    teachers without an MLM head (LOSSES): alpha_hid * L_hid on the layers below the last, each
    against the teacher layer it copies (layer_map), and alpha_pool * L_pool on the mean-pooled
    sentence embedding. Returns (loss, {term: value}). dtypes = (teacher dtype, student dtype) on
    the autocast device.

    Which rows get vocabulary logits: the (N, V) head is about a quarter of the student's FLOPs, so
    it runs only where a loss reads it. L_ce compares the teacher's and the student's distributions
    on every real token, masked or not (as the reference's `mlm_mask` of all non-pad tokens); L_mlm
    only needs the ~15% of rows that the MLM predicts. So with L_ce on, the student computes logits
    on all N rows and L_mlm picks its rows from them; with L_ce off, logits on the predicted rows
    only; with both off, none. The teacher's logits are computed only for L_ce.
    """
    from losses import L_ce, L_cos, L_hid, L_mlm, L_pool, total_loss
    (t_dtype, s_dtype), device = dtypes, input_ids.device.type
    real = attention_mask.bool()  # (B, T)
    labels = labels[real]  # (N,) the original id where the MLM predicts, else -100
    predicted = labels != -100  # (N,)
    with torch.no_grad(), torch.autocast(device, t_dtype, enabled=t_dtype != torch.float32):
        t_states = teacher(input_ids, attention_mask, return_logits=False).hidden_states
        t_hidden = t_states[-1][real]  # (N, H)
        t_logits = teacher.mlm_logits(t_hidden) if cfg.alpha_ce > 0 else None  # (N, V)
    if cfg.alpha_ce > 0:
        logit_rows = slice(None)
    else:
        logit_rows = predicted if cfg.alpha_mlm > 0 else None
    with torch.autocast(device, s_dtype, enabled=s_dtype != torch.float32):
        s_states, s_logits = student(input_ids, attention_mask, real, logit_rows)
    s_hidden = s_states[-1][real]  # (N, H)
    terms = {}
    if cfg.alpha_ce > 0:
        terms["ce"] = L_ce(s_logits, t_logits, cfg.temperature)
        s_logits = s_logits[predicted]  # from here on, the predicted rows only
    if cfg.alpha_mlm > 0:
        terms["mlm"] = L_mlm(s_logits, labels[predicted])
    if cfg.alpha_cos > 0:
        terms["cos"] = L_cos(s_hidden, t_hidden.float())
    below = layer_map(len(t_states) - 1, len(s_states) - 1)[:-1]  # a 1-layer student: none
    if cfg.alpha_hid > 0 and below:  # hidden_states[0] is the embeddings: layer i's is [i + 1]
        terms["hid"] = L_hid([s_states[j + 1][real] for j in range(len(below))],
                             [t_states[i + 1][real].float() for i in below])
    if cfg.alpha_pool > 0:
        terms["pool"] = L_pool(s_states[-1], t_states[-1], attention_mask)
    weights = {"ce": cfg.alpha_ce, "mlm": cfg.alpha_mlm, "cos": cfg.alpha_cos,
               "hid": cfg.alpha_hid, "pool": cfg.alpha_pool}
    return total_loss(terms, weights), terms


# ----------------------------------------------------------------------------- the output folder

RUN_MARKER = "tinydistil-run.json"  # marks --out as ours: --overwrite replaces only our own files
RUN_FILES = (RUN_MARKER, "checkpoints", "train_log.jsonl", "model.safetensors", "config.json",
             "tokenizer.json", "vocab.txt", "tokenizer_config.json")
# what a sentence-transformers teacher's student carries (tasks/zero_shot.py), replaced as well
RUN_FILES += ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
              "1_Pooling", "2_Normalize")
RESUMABLE_CHANGES = {"resume", "overwrite", "log_every", "save_every", "device", "data_dir"}


class claim_out_dir:
    """`with claim_out_dir(cfg, out, master):` --out must be new, empty, or a tinydistil run of its
    own (then --resume or --overwrite): a user's files are never overwritten. The folder is created
    and written to before the teacher loads, so a bad path fails in a second, not after the run;
    if the run then fails before its first checkpoint, a folder this call created is removed."""

    def __init__(self, cfg, out: Path, master: bool):
        self.out, self.created = out, False
        if master:
            self.created = not out.exists()
            check_out_dir(cfg, out)
            try:
                out.mkdir(parents=True, exist_ok=True)
                marker = json.dumps({"config": asdict(cfg)}, indent=1)
                atomic_write(out / RUN_MARKER, marker.encode())
            except OSError as e:
                raise UserError(f"cannot write to --out {out} ({e.strerror}): give a folder you "
                                f"can write to") from None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None and self.created and not (self.out / "checkpoints").exists():
            shutil.rmtree(self.out, ignore_errors=True)


def check_out_dir(cfg, out: Path):
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = RUN_MARKER in entries
    if entries and not ours:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"--out {out} holds files that are not a tinydistil run ({shown}): give a "
                        f"new or empty folder")
    latest = out / "checkpoints" / "latest"
    if cfg.resume and not latest.is_file():
        raise UserError(f"--resume: {out} has no complete checkpoint to continue from")
    if ours and not (cfg.resume or cfg.overwrite):
        held = f"checkpoint {latest.read_text().strip()}" if latest.is_file() else "a student"
        raise UserError(f"{out} already holds a tinydistil run ({held}): pass --resume to continue "
                        f"it, --overwrite to replace it, or choose another --out")
    if ours and cfg.overwrite:
        replaced = [name for name in RUN_FILES if (out / name).exists()]
        print(f"--overwrite: replacing {', '.join(replaced)} in {out}")
        for name in replaced:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, student, opt, step, data_position, mask_gen, cfg, dist):
    """checkpoints/step-N/ (the student + train_state.pt) is written under a temporary name and
    renamed when complete, then checkpoints/latest points at it: a kill at any moment leaves the
    previous checkpoint whole. The student is also saved at the top of --out for `eval`."""
    rng = {"torch": [torch.get_rng_state()], "mask": [mask_gen.get_state()],
           "cuda": [torch.cuda.get_rng_state(mask_gen.device) if mask_gen.device.type == "cuda"
                    else None]}
    if dist.world > 1:  # every rank has its own dropout and masking streams
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, rng)
        rng = {k: [g[k][0] for g in gathered] for k in rng}
    if dist.rank != 0:
        return
    ckpts = out / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    torch.save({"step": step, "data_position": data_position, "optimizer": opt.state_dict(),
                "rng": rng, "config": asdict(cfg)}, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(ckpts / "latest", final.name.encode())
    for old in ckpts.glob("step-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    student.save_pretrained(out)
    save_sentence_transformers_files(student, out)


def save_sentence_transformers_files(student, out: Path):
    """A sentence-transformers teacher gives a sentence-transformers student: its modules.json,
    pooling and settings are copied beside the student, so SentenceTransformer(out) loads it and
    pools as the teacher (and as `eval stsb --zero-shot` scores it)."""
    from tasks.zero_shot import copy_sentence_transformers_files
    copy_sentence_transformers_files(student.source_dir, out)


def read_checkpoint(cfg, out: Path, world: int) -> dict:
    """The last complete checkpoint's train_state, after checking it belongs to this very run."""
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    try:
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"--resume: cannot read {ckpt / 'train_state.pt'} ({e})") from None
    saved = state["config"]
    if len(state["rng"]["torch"]) != world:
        raise UserError(f"--resume: {out} was trained by {len(state['rng']['torch'])} processes, "
                        f"this run has {world}: resume with the same number")
    changed = [k for k, v in asdict(cfg).items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:  # the step count sets the lr schedule, the seed the masks: all must match
        raise UserError(f"--resume: {out} was trained with other settings ("
                        + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} not {getattr(cfg, k)}"
                                    for k in changed) + "): pass the same arguments")
    return {**state, "dir": ckpt}


def restore_checkpoint(state, student, opt, mask_gen, rank, out: Path, master: bool):
    """Weights, optimizer, random streams and data position of a checkpoint: the run continues
    bit for bit as if never stopped. Log lines written after the checkpoint are dropped."""
    from model import BERT
    student.load_state_dict(BERT.from_pretrained(str(state["dir"])).state_dict())
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"][rank])
    if mask_gen.device.type == "cuda":  # dropout on the GPU draws from the device's generator
        torch.cuda.set_rng_state(state["rng"]["cuda"][rank], mask_gen.device)
    mask_gen.set_state(state["rng"]["mask"][rank])
    log_path = out / "train_log.jsonl"
    if master and log_path.is_file():
        lines = log_path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= state["step"]]
        atomic_write(log_path, "".join(line + "\n" for line in kept).encode())
    return state["step"], state["data_position"]


# ------------------------------------------------------------------------ processes, signals, logs

@dataclass
class Distributed:
    rank: int
    world: int
    device: torch.device


def start_processes(device_name: str) -> Distributed:
    """DDP when launched by torchrun (one process per GPU: nccl; on CPU: gloo), else one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(0, 1, pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":  # NCCL and all_gather_object use the current device: one GPU per rank
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, device)


def stop_processes(dist: Distributed):
    if dist.world > 1:  # rank 0 may still be saving; tearing gloo down under it aborts the others
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint and stops; main() exits with 128 + the signal."""


class StopSignal:
    """SIGTERM (what a cluster sends before preemption) lets the current step finish; the loop then
    saves a checkpoint and stops. Under DDP every rank must agree, so the flag is all-reduced."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.received = True

    def agreed(self, dist: Distributed) -> bool:
        if dist.world == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


_PEAKS = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """FLOP/s of the best of several large square matmuls: the denominator of MFU (no vendor table,
    CPU included), or None for bfloat16 where it is emulated. Measured once per process."""
    if dtype == torch.bfloat16 and not has_bfloat16_matmul(device):
        return None
    if (device, dtype) not in _PEAKS:
        n = 4096 if device.type == "cuda" else 2048
        numbers = torch.Generator(device).manual_seed(0)  # not the global stream: resume replays it
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=numbers) for _ in range(2))
        best = float("inf")
        with torch.inference_mode():
            for _ in range(4):  # the first warms up; the best of the rest is the least disturbed
                sync(device)
                t0 = time.perf_counter()
                a @ b
                sync(device)
                best = min(best, time.perf_counter() - t0)
        _PEAKS[(device, dtype)] = 2 * n ** 3 / best
    return _PEAKS[(device, dtype)]


def flops_per_token(cfg, seq_len: int, with_head: bool) -> float:
    """Model FLOPs of one token's forward: 2 per multiply-add in the layers' matmuls, attention's
    two (T x T) products, and the vocabulary head when a loss needs it on every row (L_ce)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_len * H
    return cfg.n_layer * layer + (2 * (H * H + H * cfg.vocab_size) if with_head else 0)


class TrainLog:
    """One `|`-separated line per log interval: step, loss terms, lr, grad norm, ms/step, tokens/s,
    MFU and ETA, also appended to --out/train_log.jsonl; a tqdm bar over the steps (rank 0 only).
    MFU = model FLOPs done / (seconds x peak FLOP/s of each model's dtype); the teacher runs forward
    only, the student forward and backward (3x). The peak is the best matmul speed seen so far."""

    def __init__(self, cfg, models, dtypes, dist, total_steps, step):
        self.cfg, self.models, self.dtypes, self.dist = cfg, models, dtypes, dist
        self.total, self.logged_at, self.peak_scale = total_steps, step, 1.0
        self.peaks = [peak_flops(dist.device, dtype) for dtype in dtypes]
        self.path = Path(cfg.out) / "train_log.jsonl"
        self.bar = tqdm(total=total_steps, initial=step, unit="step", disable=dist.rank != 0,
                        dynamic_ncols=True, leave=False)
        self.reset()

    def reset(self):
        self.loss_sums, self.tokens, self.seconds_at_peak = {}, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss, terms, n_tokens: int, seq_len: int):
        """After each micro-batch: its loss terms (a step's is the mean of its micro-batches'; a
        log line shows the mean over its steps), tokens and FLOPs."""
        for name, value in {"loss": loss, **terms}.items():
            step_share = value.item() / self.cfg.grad_accum
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + step_share
        self.tokens += n_tokens * self.dist.world
        with_head = self.cfg.alpha_ce > 0
        for model, peak, passes in zip(self.models, self.peaks, (1, 3)):
            flops = passes * n_tokens * flops_per_token(model.config, seq_len, with_head)
            self.seconds_at_peak += flops / peak if peak else float("nan")

    def step(self, step: int, lr: float, grad_norm: float):
        self.bar.update()
        if step % self.cfg.log_every and step != self.total:
            return
        sync(self.dist.device)
        seconds, n_steps = time.perf_counter() - self.t0, step - self.logged_at
        ms = 1000 * seconds / n_steps
        self.peak_scale = max(self.peak_scale, self.seconds_at_peak / seconds)  # never above 100%
        mfu = self.seconds_at_peak / seconds / self.peak_scale
        names = ("loss", "ce", "mlm", "cos", "hid", "pool")
        means = {k: self.loss_sums.get(k, 0.0) / n_steps for k in names}
        rec = {"step": step, "loss": means["loss"], "loss_ce": means["ce"],
               "loss_mlm": means["mlm"], "loss_cos": means["cos"], "loss_hid": means["hid"],
               "loss_pool": means["pool"], "lr": lr,
               "grad_norm": grad_norm, "ms_per_step": ms,
               "tokens_per_s": self.tokens / seconds, "mfu": None if math.isnan(mfu) else mfu}
        eta = time.strftime("%H:%M:%S", time.gmtime(ms / 1000 * (self.total - step)))
        shown = ("ce", "mlm", "cos") + tuple(k for k in ("hid", "pool")  # the head-less terms
                                             if getattr(self.cfg, "alpha_" + k) > 0)
        terms = " | ".join(f"{k} {rec['loss_' + k]:.4f}" for k in shown)
        mfu_text = f"MFU {100 * mfu:.1f}%"
        if rec["mfu"] is None:
            mfu_text = "MFU unknown (no native bfloat16)"
        if self.dist.rank == 0:
            self.bar.write(f"step {step:5d}/{self.total} | loss {rec['loss']:.4f} | {terms} | "
                           f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {ms:.0f} ms/step | "
                           f"{rec['tokens_per_s']:.0f} tokens/s | {mfu_text} | ETA {eta}")
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.logged_at = step
        self.reset()

    def pause(self, seconds: float):
        self.t0 += seconds  # the log's speed is the training's, not the disk's


# ----------------------------------------------------------------------------- pretraining

def load_teacher(cfg):
    """The teacher (paper: bert-base-uncased), checked against the settings that depend on it."""
    from model import BERT
    teacher = BERT.from_pretrained(cfg.teacher)
    if cfg.seq_len > teacher.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len}: the teacher has only "
                        f"{teacher.config.max_position_embeddings} positions")
    layer_map(teacher.config.n_layer, cfg.n_layer)  # a student deeper than its teacher is refused
    return teacher


def load_data(cfg, teacher, dist):
    """The corpus in the teacher's tokenizer, the masking weights of its tokens, and the batches.
    Rank 0 tokenises and writes the cache first; the other ranks then read it."""
    from data import Batches, data_dir, load_corpus, load_tokenizer, special_ids, token_probs
    tok = load_tokenizer(teacher.source_dir)
    ids = special_ids(tok)
    seqs = None
    for turn in ("first", "then"):
        if (dist.rank == 0) == (turn == "first"):
            seqs = load_corpus(cfg.data, tok, data_dir(cfg.data_dir),
                               data_fraction=cfg.data_fraction, seq_len=cfg.seq_len)
        if dist.world > 1:
            torch.distributed.barrier()
    probs = token_probs(seqs, teacher.config.vocab_size, ids.values(), cfg.mlm_smoothing)
    batches = Batches(seqs.lengths, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    if dist.rank == 0:
        print(f"data {cfg.data}: {seqs.stats['sequences']} sequences, {seqs.stats['tokens']} "
              f"tokens, {len(batches)} batches of {cfg.batch_size} per process and epoch")
    return Corpus(seqs, ids, probs, batches)


@dataclass
class Corpus:
    seqs: object  # data.Sequences: token ids of every sequence
    ids: dict  # special token -> id
    probs: torch.Tensor  # (V,) masking weight of each token id
    batches: object  # data.Batches: this rank's length-grouped batches


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pretrain(cfg: PretrainConfig):
    """Distil a student from cfg.teacher (paper sections 2 and 3) into cfg.out; return it."""
    from data import WIKITEXT, corpus_files
    from model import configure_optimizers
    dist = start_processes(cfg.device)
    cfg = resolve_recipe(cfg, dist.world, dist.device)
    check_config(cfg)
    out, master = Path(cfg.out), dist.rank == 0
    echo = print if master else quiet
    with claim_out_dir(cfg, out, master):
        if cfg.data not in WIKITEXT:  # a missing corpus path fails before the teacher loads
            corpus_files(cfg.data, None)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout (and a random student) differ per rank
        random.seed(cfg.seed)

        # The teacher, the corpus, and the student made from the teacher (section 2). Whether the
        # teacher has an MLM head decides the loss recipe (LOSSES), saved with the run.
        teacher = load_teacher(cfg)
        cfg = resolve_losses(cfg, teacher.config.mlm_head)
        state = read_checkpoint(cfg, out, dist.world) if cfg.resume else None
        if master:
            atomic_write(out / RUN_MARKER, json.dumps({"config": asdict(cfg)}, indent=1).encode())
        echo(describe_recipe(cfg, dist.world, teacher.config.mlm_head))
        corpus = load_data(cfg, teacher, dist)
        student, layers = init_student(teacher, cfg.n_layer, cfg.student_init, cfg.train_positions)
        echo(f"student: {cfg.student_init} init from teacher layers {layers}, "
             f"{student.num_params() / 1e6:.1f}M params (teacher "
             f"{teacher.num_params() / 1e6:.1f}M),"
             f" position embeddings {'trained' if cfg.train_positions else 'frozen'}")
        total_steps = cfg.max_steps
        if total_steps is None:
            total_steps = cfg.epochs * max(1, len(corpus.batches) // cfg.grad_accum)
        if total_steps == 0:
            if master:
                student.save_pretrained(out)
                save_sentence_transformers_files(student, out)
            echo(f"--max-steps 0: saved the initialised student to {out}")
            stop_processes(dist)
            return student

        # Optimisation (section 3): AdamW as the reference (betas 0.9/0.98, eps 1e-6), linear
        # warm-up then decay, gradient clipping. The frozen teacher runs in its own precision.
        dtypes = (DTYPES[cfg.teacher_dtype], DTYPES[cfg.dtype])
        teacher.to(dist.device, dtypes[0]).eval().requires_grad_(False)
        student.to(dist.device).train()
        opt = configure_optimizers(student, cfg.lr, cfg.weight_decay, betas=(0.9, 0.98), eps=1e-6)
        model = StudentForDistillation(student)
        if dist.world > 1:  # with L_ce and L_mlm both off, the MLM head gets no gradient
            model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=cfg.alpha_ce == cfg.alpha_mlm == 0)
        # Masking draws from its own random stream, apart from dropout's.
        mask_gen = torch.Generator(dist.device).manual_seed(1_000_003 * (cfg.seed + 1) + dist.rank)
        step, data_position = 0, (0, 0)
        if state is not None:
            step, data_position = restore_checkpoint(state, student, opt, mask_gen, dist.rank, out,
                                                     master)
            echo(f"resumed from {state['dir']} at step {step}")
        run = Run(cfg, teacher, model, opt, corpus, mask_gen, dtypes, dist, total_steps)
        distil(run, step, data_position)
        echo(f"saved the student to {out}; fine-tune it with: "
             f"python tinydistil.py eval sst2 --model {out}")
        stop_processes(dist)
        return student


@dataclass
class Run:
    """What the loop works with, made by pretrain() in the paper's order."""
    cfg: PretrainConfig
    teacher: nn.Module
    model: nn.Module  # StudentForDistillation, wrapped in DDP when there are several processes
    opt: torch.optim.Optimizer
    corpus: "Corpus"
    mask_gen: torch.Generator
    dtypes: tuple  # (teacher dtype, student dtype)
    dist: Distributed
    total_steps: int


def distil(run: Run, step: int, data_position: tuple):
    """The training loop, from step on: one optimizer step per cfg.grad_accum micro-batches."""
    from data import collate, mask_batch
    cfg, dist, corpus, student = run.cfg, run.dist, run.corpus, unwrap(run.model).student
    stream = corpus.batches.stream(*data_position)
    save_every = cfg.save_every or max(1, math.ceil(run.total_steps / 5))
    warmup = warmup_steps(run.total_steps, cfg.warmup)
    log = TrainLog(cfg, (run.teacher, student), run.dtypes, dist, run.total_steps, step)
    stop = StopSignal()
    try:
        while step < run.total_steps:
            # Micro-batches, each masked afresh (dynamic masking, as RoBERTa and the paper); DDP
            # averages the gradients over processes once, on the last one.
            for micro in range(cfg.grad_accum):
                epoch, batch_index, idx = next(stream)
                input_ids, attention_mask = (t.to(dist.device) for t in collate(corpus.seqs, idx,
                                                                                 corpus.ids["pad"]))
                input_ids, labels = mask_batch(input_ids, attention_mask, corpus.probs,
                                               corpus.ids["mask"], run.teacher.config.vocab_size,
                                               run.mask_gen, cfg.mlm_mask_prop)
                with no_sync(run.model, micro < cfg.grad_accum - 1):
                    loss, terms = distillation_loss(run.teacher, run.model, input_ids,
                                                    attention_mask, labels, cfg, run.dtypes)
                    (loss / cfg.grad_accum).backward()
                log.add(loss, terms, int(attention_mask.sum()), input_ids.shape[1])
            # The update: the lr warms up then decays linearly; the gradient norm is clipped.
            lr = cfg.lr * lr_factor(step, run.total_steps, warmup)
            for group in run.opt.param_groups:
                group["lr"] = lr
            grad_norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm).item()
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            step += 1
            log.step(step, lr, grad_norm)
            # Save every save_every steps, at the end, and when SIGTERM asks the run to stop.
            stopping = stop.agreed(dist)
            if step % save_every == 0 or step == run.total_steps or stopping:
                t_save = time.perf_counter()
                save_checkpoint(Path(cfg.out), student, run.opt, step, (epoch, batch_index + 1),
                                run.mask_gen, cfg, dist)
                log.pause(time.perf_counter() - t_save)
            if stopping and step < run.total_steps:
                raise Preempted(f"stopped by SIGTERM after step {step}, saved in {cfg.out}; "
                                f"continue with: {resume_command()}")
    finally:
        stop.restore()
        log.bar.close()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """DDP's no_sync() on micro-batches whose gradients are only accumulated, else nothing."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def quiet(*args, **kwargs):
    """print() for the ranks other than 0, which keep silent."""


def resume_command() -> str:
    args = sys.argv[1:] if "--resume" in sys.argv else sys.argv[1:] + ["--resume"]
    return shlex.join(["python", Path(sys.argv[0]).name, *args])
# ----------------------------------------------------------------------------- fill-mask

@dataclass
class FillMaskConfig:
    text: str = "the capital of france is [MASK] ."
    model: str = "bert-base-uncased"  # Hub repo id or local folder
    top_k: int = 5                    # predictions shown per [MASK]


def fill_mask(cfg: FillMaskConfig):
    """Top-k predictions for each [MASK]: the first check that a teacher loaded right."""
    from data import load_tokenizer, special_ids
    from model import BERT
    if cfg.top_k < 1:
        raise UserError(f"--top-k {cfg.top_k}: show at least 1 prediction")
    model = BERT.from_pretrained(cfg.model)
    if not model.config.mlm_head:
        raise UserError(f"{cfg.model} has no MLM head (a bare encoder): fill-mask needs one")
    tok = load_tokenizer(model.source_dir)
    ids = torch.tensor([tok.encode(cfg.text).ids])  # (1, T)
    where = (ids[0] == special_ids(tok)["mask"]).nonzero().flatten().tolist()
    if not where:
        raise UserError(f"no [MASK] token in {cfg.text!r}")
    with torch.no_grad():
        probs = model(ids).logits[0].softmax(-1)  # (T, V)
    for pos in where:
        p, top = probs[pos].topk(min(cfg.top_k, probs.shape[-1]))
        print(f"[MASK] at token {pos}:")
        for prob, token_id in zip(p.tolist(), top.tolist()):
            print(f"  {prob:.4f}  {tok.id_to_token(token_id)}")


# ----------------------------------------------------------------------------- report

@dataclass
class ReportConfig:
    results: str = "results.jsonl"  # what `eval` appended to
    teacher: Optional[str] = None   # the model retention is relative to (default: tasks/report.py)


def report(cfg: ReportConfig):
    from tasks.report import render
    print(render(cfg.results, cfg.teacher))


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    from fit_head import FitHeadConfig, fit_head
    from tasks.finetune import EvalConfig, run
    commands = {  # name -> (config dataclass, positional fields, function, one-line help)
        "pretrain": (PretrainConfig, (), pretrain, "distil a student from a BERT teacher"),
        "eval": (EvalConfig, ("task",), run, "fine-tune and score a model on a task (or glue)"),
        "report": (ReportConfig, (), report, "render the paper's Tables 1 and 2 from the results"),
        "fill-mask": (FillMaskConfig, ("text",), fill_mask, "top predictions for [MASK] tokens"),
        "fit-head": (FitHeadConfig, ("teacher",), fit_head,
                     "fit an MLM head on a frozen encoder without one (a sentence encoder)"),
    }
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, positional, _, help_) in commands.items():
        add_dataclass_args(sub.add_parser(name, help=help_, description=help_), cls, positional)
    args = vars(parser.parse_args(argv))
    cls, _, command, _ = commands[args.pop("command")]
    try:
        command(cls(**args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
