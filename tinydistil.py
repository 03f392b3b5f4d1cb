"""tinydistil.py: DistilBERT (Sanh et al. 2019) on a page, and the command line around it.

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
Read it top to bottom, as the paper: the config and its two recipes, the student (section 2), the
loss of one batch, `pretrain`, then the loop. What a run needs around the method (its folder and
lock, checkpoints, processes, signals, the log and its MFU) is in harness.py. Every command's
options are the fields of its config dataclass; `--help` lists them with defaults.
"""
import argparse
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from common import (DTYPES, UserError, add_dataclass_args, atomic_write, check_output_file,
                    has_bfloat16_matmul, lr_factor, os_error_line, use_tf32, warmup_steps)
from corpus import WIKITEXT, corpus_files, data_dir, load_corpus
from data import Batches, Sequences, collate, load_tokenizer, mask_batch, mask_weights, special_ids
from fit_head import FitHeadConfig, fit_head
from harness import (ADAMW_BETAS, ADAMW_EPS, RUN_MARKER, Distributed, Preempted, StopSignal,
                     TrainLog, check_checkpoint_space, claim_out_dir, masking_stream, no_sync,
                     rank_0_first, read_checkpoint, restore_checkpoint, resume_command,
                     save_checkpoint, save_sentence_transformers_files, start_processes,
                     stop_processes, unwrap)
from losses import L_ce_chunked, L_cos, L_hid, L_mlm, L_pool, total_loss
from model import BERT, configure_optimizers
from tasks.finetune import EvalConfig, run as eval_run
from tasks.report import render, render_svg


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
    epochs: int = 3                      # passes over the data (the reference's 3)
    batch_size: Optional[int] = None     # sequences per micro-batch and process; None: the recipe's
    grad_accum: Optional[int] = None     # micro-batches per optimizer step; None: the recipe's
    seq_len: Optional[int] = None        # longer texts are cut into chunks of this many tokens
    lr: Optional[float] = None           # peak learning rate; None: LOSSES' (5e-4; head-less 2e-4)
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
    ddp_timeout: float = 360.0           # minutes DDP ranks wait for rank 0 to prepare the corpus


# What a field left at None becomes: only what differs between the recipes (both train 3 epochs
# at lr 5e-4, the reference's). "paper" is the reference's training_configs + train.py: 2,000
# sequences per update (5 per GPU x 50 accumulation steps x 8 GPUs), up to 512 tokens, float32
# soft targets. "small" fits a laptop; studies/retention.md measured its choices,
# and studies/teacher_precision.md its teacher: bfloat16 moves the targets 4-5 orders of magnitude
# less than the losses and runs 3.5x faster where the hardware has it (and 3.4x slower where not).
RECIPES = {
    "small": dict(data_fraction=0.1, batch_size=16, grad_accum=1, seq_len=128,
                  teacher_dtype="auto"),
    "paper": dict(data_fraction=1.0, batch_size=5, grad_accum=None, seq_len=512,
                  teacher_dtype="float32"),
}
PAPER_SEQUENCES_PER_STEP = 2000  # paper recipe: grad_accum = this / (batch_size x processes)

# What a loss field or the lr left at None becomes: the teacher decides. With an MLM head
# (bert-base-uncased) the paper's triple loss 5 * L_ce + 2 * L_mlm + 1 * L_cos on 15% masked tokens
# at the reference's lr 5e-4. Without one (a sentence encoder: MiniLM, e5, bge, ...) L_ce has no
# soft targets, and L_mlm would train a fresh head whose gradients pull the encoder away from the
# teacher. studies/retention_sts.md measured what a 3-layer MiniLM student keeps of zero-shot
# STS-B (teacher 86.72, truncation 79.63): with 2 L_mlm + 1 L_cos 70.6, with L_cos alone 83.5,
# and neither masking, L_hid nor L_pool move it further. Its whole gain comes in the first steps
# (4 steps: 83.7); what follows on WikiText-2 fits the student to that text, not to sentences, so a
# smaller step keeps more (lr 1e-3: 83.1, 5e-4: 83.5, 2e-4: 83.8; 1e-4 no better beyond seed
# noise, medians of 3 seeds). So L_cos alone, on clean text (masking serves only L_ce and L_mlm),
# at lr 2e-4. What is left is the corpus, not the loss: the whole of WikiText-2 reaches 84.3, the
# same recipe on STS-B's own training sentences 86.45.
LOSSES = {
    "mlm head": dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_hid=0.0, alpha_pool=0.0,
                     mlm_mask_prop=0.15, lr=5e-4),
    "no mlm head": dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=1.0, alpha_hid=0.0, alpha_pool=0.0,
                        mlm_mask_prop=0.0, lr=2e-4),
}


def check(rules: list):
    """Each (ok, message) rule in order: the message of the first broken one, as a UserError."""
    for ok, message in rules:
        if not ok:
            raise UserError(message)


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
    check(rules)
    return cfg


def check_config(cfg: PretrainConfig):
    """Every setting that can be judged before anything loads: one line for the first wrong one."""
    rules = [
        (cfg.lr is None or cfg.lr > 0, f"--lr {cfg.lr}: the learning rate must be positive"),
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
    check(rules)


def describe_losses(cfg: PretrainConfig, mlm_head: bool = True) -> str:
    """The loss part of the first log line: its terms, their weights, and the masking."""
    terms = [f"{w:g} {name}" for w, name in ((cfg.alpha_ce, "L_ce"), (cfg.alpha_mlm, "L_mlm"),
                                            (cfg.alpha_cos, "L_cos"), (cfg.alpha_hid, "L_hid"),
                                            (cfg.alpha_pool, "L_pool")) if w > 0]
    masking = (f"{cfg.mlm_mask_prop:.0%} of the tokens masked" if cfg.mlm_mask_prop > 0
               else "unmasked input")
    line = f"loss {' + '.join(terms)}, {masking}"
    if not mlm_head:
        line += " (the teacher has no MLM head: LOSSES['no mlm head'] for what is not given)"
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


# ------------------------------------------------------------------------ the loss of one batch

@dataclass
class Batch:
    """A masked micro-batch on the device, with the rows the losses read. The rows are found on the
    host, where collate and mask_batch made the batch: selecting them on a GPU by a boolean mask
    would make the CPU wait for the GPU (to learn how many rows) several times a micro-batch."""
    input_ids: torch.Tensor  # (B, T)
    attention_mask: Optional[torch.Tensor]  # (B, T), or None when no row is padded
    token_rows: torch.Tensor  # (N,) where the tokens (not padding) are in the flattened (B*T)
    predicted: torch.Tensor  # (M,) which of those N rows the MLM predicts
    labels: torch.Tensor  # (M,) their original ids
    n_tokens: int  # N, known on the host


def to_device(input_ids, attention_mask, labels, device: torch.device) -> Batch:
    """The host's masked micro-batch (collate, mask_batch) on the device. Without padding there
    is no attention mask at all, so SDPA may pick its flash kernel. Copies from pinned memory do
    not block the host (non_blocking)."""
    token_rows = attention_mask.flatten().nonzero().squeeze(1)  # (N,)
    token_labels = labels.flatten()[token_rows]  # (N,) the original id where predicted, else -100
    predicted = (token_labels != -100).nonzero().squeeze(1)  # (M,)
    padded = len(token_rows) < attention_mask.numel()

    def move(t):
        t = t.pin_memory() if device.type == "cuda" else t
        return t.to(device, non_blocking=True)
    return Batch(move(input_ids), move(attention_mask) if padded else None, move(token_rows),
                 move(predicted), move(token_labels[predicted]), len(token_rows))


class StudentForDistillation(nn.Module):
    """The student's forward during distillation: the hidden states of every layer, (B, T, H) each,
    and MLM logits only on the rows a loss reads. A module of its own so DistributedDataParallel
    sees every use of the weights inside one forward."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, token_rows, logit_rows):
        states = self.student(input_ids, attention_mask, return_logits=False).hidden_states
        hidden = states[-1].flatten(0, 1)[token_rows]  # (N, H): no loss reads the padding
        logits = self.student.mlm_logits(hidden[logit_rows]) if logit_rows is not None else None
        return states, hidden, logits  # states: (B, T, H) each; hidden (N, H); logits (rows, V)


def distillation_loss(teacher, student, batch: Batch, cfg, dtypes):
    """The paper's training loss on one masked micro-batch: alpha_ce * L_ce + alpha_mlm * L_mlm
    + alpha_cos * L_cos (5, 2, 1), every term over the N tokens (padding is not text); and two
    terms for teachers without an MLM head (LOSSES): alpha_hid * L_hid on the layers below the
    last, each against the teacher layer it copies (layer_map), and alpha_pool * L_pool on the
    mean-pooled sentence embedding. Returns (loss, {term: value}). dtypes = (teacher dtype,
    student dtype) on the autocast device.

    Which rows get vocabulary logits: the (N, V) head is about a quarter of the student's FLOPs, so
    it runs only where a loss reads it. L_ce compares the teacher's and the student's distributions
    on every token, masked or not (as the reference's `mlm_mask` of all non-pad tokens); L_mlm
    only needs the ~15% of rows that the MLM predicts. So with L_ce on, the student computes logits
    on all N rows and L_mlm picks its rows from them; with L_ce off, logits on the predicted rows
    only; with both off, none. The teacher's logits are computed only for L_ce.
    """
    (t_dtype, s_dtype), device = dtypes, batch.input_ids.device.type
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    token_rows, predicted = batch.token_rows, batch.predicted
    with torch.no_grad(), torch.autocast(device, t_dtype, enabled=t_dtype != torch.float32):
        t_states = teacher(input_ids, attention_mask, return_logits=False).hidden_states
        t_hidden = t_states[-1].flatten(0, 1)[token_rows]  # (N, H)
        t_logits = teacher.mlm_logits(t_hidden) if cfg.alpha_ce > 0 else None  # (N, V)
    if cfg.alpha_ce > 0:
        logit_rows = slice(None)
    else:
        logit_rows = predicted if cfg.alpha_mlm > 0 else None
    with torch.autocast(device, s_dtype, enabled=s_dtype != torch.float32):
        s_states, s_hidden, s_logits = student(input_ids, attention_mask, token_rows, logit_rows)
    terms = {}
    if cfg.alpha_ce > 0:
        terms["ce"] = L_ce_chunked(s_logits, t_logits, cfg.temperature)  # L_ce, fused gradient
        s_logits = s_logits[predicted]  # from here on, the predicted rows only
    if cfg.alpha_mlm > 0:
        terms["mlm"] = L_mlm(s_logits, batch.labels)
    if cfg.alpha_cos > 0:
        terms["cos"] = L_cos(s_hidden, t_hidden.float())
    below = layer_map(len(t_states) - 1, len(s_states) - 1)[:-1]  # a 1-layer student: none
    if cfg.alpha_hid > 0 and below:  # hidden_states[0] is the embeddings: layer i's is [i + 1]
        terms["hid"] = L_hid([s_states[j + 1].flatten(0, 1)[token_rows] for j in range(len(below))],
                             [t_states[i + 1].flatten(0, 1)[token_rows].float() for i in below])
    if cfg.alpha_pool > 0:  # no attention mask means no padding: every position is a token
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        terms["pool"] = L_pool(s_states[-1], t_states[-1], mask)
    weights = {"ce": cfg.alpha_ce, "mlm": cfg.alpha_mlm, "cos": cfg.alpha_cos,
               "hid": cfg.alpha_hid, "pool": cfg.alpha_pool}
    return total_loss(terms, weights), terms


# ----------------------------------------------------------------------------- pretrain

def load_teacher(cfg: PretrainConfig) -> BERT:
    """The teacher (paper: bert-base-uncased), checked against the settings that depend on it."""
    teacher = BERT.from_pretrained(cfg.teacher)
    if cfg.seq_len > teacher.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len}: the teacher has only "
                        f"{teacher.config.max_position_embeddings} positions")
    layer_map(teacher.config.n_layer, cfg.n_layer)  # a student deeper than its teacher is refused
    return teacher


@dataclass
class Corpus:
    """The text of section 3 as the loop reads it: what load_data returns."""
    seqs: Sequences  # token ids of every sequence
    special: dict  # special token -> id: "pad", "mask", ...
    mask_weights: torch.Tensor  # (V,) unnormalised masking weight of each token id
    batches: Batches  # this rank's length-grouped batches


def load_data(cfg: PretrainConfig, teacher: BERT, dist: Distributed) -> Corpus:
    """The corpus in the teacher's tokenizer, the masking weights of its tokens, and the batches.
    Rank 0 tokenises and writes the cache first; the other ranks then read it."""
    tok = load_tokenizer(teacher.source_dir)
    special = special_ids(tok)
    seqs = rank_0_first(dist, cfg.ddp_timeout, lambda: load_corpus(
        cfg.data, tok, data_dir(cfg.data_dir), data_fraction=cfg.data_fraction,
        seq_len=cfg.seq_len))
    weights = mask_weights(seqs, teacher.config.vocab_size, special.values(), cfg.mlm_smoothing)
    batches = Batches(seqs.lengths, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    dist.say(f"data {cfg.data}: {seqs.stats['sequences']} sequences, {seqs.stats['tokens']} "
             f"tokens, {len(batches)} batches of {cfg.batch_size} per process and epoch")
    return Corpus(seqs, special, weights, batches)


def pretrain(cfg: PretrainConfig):
    """Distil a student from cfg.teacher (paper sections 2 and 3) into cfg.out; return it."""
    dist = start_processes(cfg.device, cfg.ddp_timeout)
    cfg = resolve_recipe(cfg, dist.world, dist.device)
    check_config(cfg)
    out = Path(cfg.out)
    with claim_out_dir(cfg, out, dist.rank == 0):  # --out is this run's, locked until it ends
        data_dir(cfg.data_dir)  # a --data-dir or $TINYDISTIL_DATA that is a file: at once, too
        if cfg.data not in WIKITEXT:  # a missing corpus path fails before the teacher loads
            corpus_files(cfg.data, None)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout (and a random student) differ per rank
        random.seed(cfg.seed)

        # The teacher, the corpus, and the student made from the teacher (section 2). Whether the
        # teacher has an MLM head decides the loss recipe (LOSSES), saved with the run.
        teacher = load_teacher(cfg)
        cfg = resolve_losses(cfg, teacher.config.mlm_head)
        state = read_checkpoint(cfg, out, dist.world) if cfg.resume else None
        if dist.rank == 0:
            atomic_write(out / RUN_MARKER, json.dumps({"config": asdict(cfg)}, indent=1).encode())
        dist.say(describe_recipe(cfg, dist.world, teacher.config.mlm_head))
        if tf32 := use_tf32(dist.device):
            dist.say(tf32)
        corpus = load_data(cfg, teacher, dist)
        student, layers = init_student(teacher, cfg.n_layer, cfg.student_init, cfg.train_positions)
        dist.say(f"student: {cfg.student_init} init from teacher layers {layers}, "
                 f"{student.num_params() / 1e6:.1f}M params (teacher "
                 f"{teacher.num_params() / 1e6:.1f}M),"
                 f" position embeddings {'trained' if cfg.train_positions else 'frozen'}")
        total_steps = cfg.max_steps
        if total_steps is None:
            total_steps = cfg.epochs * max(1, len(corpus.batches) // cfg.grad_accum)
        if total_steps == 0:
            if dist.rank == 0:
                student.save_pretrained(out)
                save_sentence_transformers_files(student, out)
            dist.say(f"--max-steps 0: saved the initialised student to {out}")
        else:
            try:
                train(cfg, teacher, student, corpus, state, dist, total_steps)
            except Preempted:  # every rank saved its part: leave together, after rank 0's writing
                stop_processes(dist)
                raise
            dist.say(f"saved the student to {out}; fine-tune it with: "
                     f"python tinydistil.py eval sst2 --model {out}")
        stop_processes(dist)
        return student


def train(cfg: PretrainConfig, teacher: BERT, student: BERT, corpus: Corpus, state, dist,
          total_steps: int):
    """Optimisation (section 3): AdamW as the reference (harness.ADAMW_BETAS, ADAMW_EPS), linear
    warm-up then decay, gradient clipping; then the loop, from the checkpoint in state if any."""
    # The frozen teacher runs in its own precision (bfloat16 where native: the small recipe).
    teacher.to(dist.device, DTYPES[cfg.teacher_dtype]).eval().requires_grad_(False)
    student.to(dist.device).train()
    opt = configure_optimizers(student, cfg.lr, cfg.weight_decay, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    model = StudentForDistillation(student)
    if dist.world > 1:  # with L_ce and L_mlm both off, the MLM head gets no gradient
        model = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.alpha_ce == cfg.alpha_mlm == 0)
    mask_gen = masking_stream(cfg.seed, dist.rank)
    step, data_position = 0, (0, 0)
    if state is not None:
        step, data_position, note = restore_checkpoint(state, student, opt, mask_gen, dist,
                                                       cfg.seed, Path(cfg.out), dist.rank == 0)
        dist.say(f"resumed from {state['dir']} at step {step}" + (f"; {note}" if note else ""))
    if dist.rank == 0:
        check_checkpoint_space(Path(cfg.out), student)
    train_loop(cfg, teacher, model, opt, corpus, mask_gen, dist, total_steps, step, data_position)


# ----------------------------------------------------------------------------- the loop

def train_loop(cfg: PretrainConfig, teacher: BERT, model: nn.Module, opt, corpus: Corpus,
               mask_gen: torch.Generator, dist: Distributed, total_steps: int, step: int,
               data_position: tuple):
    """The training loop, from step on: one optimizer step per cfg.grad_accum micro-batches.
    model is StudentForDistillation, wrapped in DDP when there are several processes."""
    student, out = unwrap(model).student, Path(cfg.out)
    dtypes = (DTYPES[cfg.teacher_dtype], DTYPES[cfg.dtype])
    stream = corpus.batches.stream(*data_position)
    save_every = cfg.save_every or max(1, math.ceil(total_steps / 5))
    warmup = warmup_steps(total_steps, cfg.warmup)
    log = TrainLog(cfg, (teacher, student), dtypes, dist, total_steps, step)
    stop = StopSignal()
    try:
        while step < total_steps:
            # Micro-batches, each masked afresh (dynamic masking, as RoBERTa and the paper) on the
            # host, then copied to the device; DDP averages the gradients over processes once, on
            # the last one.
            for micro in range(cfg.grad_accum):
                epoch, batch_index, idx = next(stream)
                input_ids, attention_mask = collate(corpus.seqs, idx, corpus.special["pad"])
                input_ids, labels = mask_batch(input_ids, attention_mask, corpus.mask_weights,
                                               corpus.special["mask"], teacher.config.vocab_size,
                                               mask_gen, cfg.mlm_mask_prop)
                batch = to_device(input_ids, attention_mask, labels, dist.device)
                with no_sync(model, micro < cfg.grad_accum - 1):
                    loss, terms = distillation_loss(teacher, model, batch, cfg, dtypes)
                    (loss / cfg.grad_accum).backward()
                log.add(loss, terms, batch.n_tokens, input_ids.shape[1])
            # The update: the lr warms up then decays linearly; the gradient norm is clipped.
            lr = cfg.lr * lr_factor(step, total_steps, warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            grad_norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.step(step, lr, grad_norm)
            # Save every save_every steps, at the end, and when SIGTERM asks the run to stop: a
            # preempted run continues from here with --resume, bit for bit.
            stopping = stop.agreed(dist)
            if step % save_every == 0 or step == total_steps or stopping:
                t_save = time.perf_counter()
                save_checkpoint(out, student, opt, step, (epoch, batch_index + 1), mask_gen, cfg,
                                dist)
                log.pause(time.perf_counter() - t_save)
            if stopping and step < total_steps:  # what to do is said once, by rank 0
                raise Preempted(f"stopped by SIGTERM after step {step}, saved in {cfg.out}; "
                                f"continue with: {resume_command()}" if dist.rank == 0 else "")
    finally:
        stop.restore()
        log.bar.close()

# ----------------------------------------------------------------------------- fill-mask

@dataclass
class FillMaskConfig:
    text: str = "the capital of france is [MASK] ."
    model: str = "bert-base-uncased"  # Hub repo id or local folder
    top_k: int = 5                    # predictions shown per [MASK]


def fill_mask(cfg: FillMaskConfig):
    """Top-k predictions for each [MASK]: the first check that a teacher loaded right."""
    if cfg.top_k < 1:
        raise UserError(f"--top-k {cfg.top_k}: show at least 1 prediction")
    model = BERT.from_pretrained(cfg.model)
    if not model.config.mlm_head:
        raise UserError(f"{cfg.model} has no MLM head (a bare encoder): fill-mask needs one")
    tok = load_tokenizer(model.source_dir)
    ids = torch.tensor([tok.encode(cfg.text).ids])  # (1, T)
    if ids.shape[1] > model.config.max_position_embeddings:
        raise UserError(f"the text is {ids.shape[1]} tokens, {cfg.model} takes at most "
                        f"{model.config.max_position_embeddings}: shorten it")
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
    svg: Optional[str] = None       # also draw both tables as bars beside the paper's, in this file


def report(cfg: ReportConfig):
    if cfg.svg:
        check_output_file(cfg.svg, "--svg")
    print(render(cfg.results, cfg.teacher))
    if cfg.svg:
        atomic_write(cfg.svg, render_svg(cfg.results, cfg.teacher).encode())
        print(f"drew the tables in {cfg.svg}")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    commands = {  # name -> (config dataclass, positional fields, function, one-line help)
        "pretrain": (PretrainConfig, (), pretrain, "distil a student from a BERT teacher"),
        "eval": (EvalConfig, ("task",), eval_run,
                 "fine-tune and score a model on a task (or glue)"),
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
        if str(e):
            print(str(e), file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except OSError as e:  # a failing disk where no caller expected one: still one line
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

