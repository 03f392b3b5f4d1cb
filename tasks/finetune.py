"""tasks/finetune.py: fine-tune an encoder on one downstream task of the paper and score it.

    python tinydistil.py eval sst2 --model out/student           # fine-tune on train, score dev
    python tinydistil.py eval sst2 --model out/student --seeds 5   # the median of 5 runs
    python tinydistil.py eval squad --teacher DIR                  # "(D)": distil once more
    python tinydistil.py eval glue --model bert-base-uncased       # the nine GLUE tasks
    python tinydistil.py report                                    # Tables 1 and 2

Paper section 4 and 4.1, Tables 1 and 2: every model is fine-tuned per task and scored on GLUE dev
(MNLI: matched and mismatched), IMDb test and SQuAD v1.1 dev, with the reference heads
(tasks/heads.py). Training: AdamW (model.configure_optimizers: weight decay 0.01, none on biases
and LayerNorm), linear warm-up then decay (common.lr_factor), gradient clipping at 1.0, batches
shuffled with the seed and padded to their longest sequence; cross-entropy, MSE for STS-B's
regression, the mean of the start and end cross-entropies for SQuAD.

The paper reports GLUE as the median of 5 runs: --seeds N runs seeds seed, seed+1, ... and records
the median of each metric with every run. Only initialisation, batch order and dropout change with
the seed: --max-train-examples and --max-eval-examples draw their subsets with a fixed seed, the
same for every run. With --teacher, the loss adds a distillation term (tasks/distil.py).

Each task appends one results line: {"task", "model", "teacher", "metrics" (the median),
"runs" [{"seed", "metrics", "train_seconds"}], "seconds", "config"}; with --out the run of --seed
is saved there. `eval glue` first makes sure all nine datasets (and teachers) are present,
downloading missing datasets, so a missing one stops the run before any training; each task is
then saved to DIR/<task>.
"""
import contextlib
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import corpus
import data
from common import (DTYPES, FolderLock, UserError, append_line, check_output_file,
                    has_bfloat16_matmul, looks_like_path, lr_factor, pick_device, use_tf32,
                    warmup_steps)
from losses import total_loss
from model import BERT, configure_optimizers
from tasks import distil, glue, imdb, squad, zero_shot
from tasks.heads import TaskModel, task_head, tokenizer_for
from tasks.metrics import accuracy

TASKS = (*glue.TASKS, "imdb", "squad")


class Recipe(NamedTuple):
    lr: float
    epochs: int
    max_seq_len: int


# Each task's default recipe: BERT's (3 epochs, lr 2e-5..5e-5); the small tasks get 5 epochs.
DEFAULTS = {t: Recipe(2e-5, 3, 128) for t in ("sst2", "qqp", "mnli", "qnli")}
DEFAULTS.update({t: Recipe(3e-5, 5, 128) for t in ("cola", "mrpc", "stsb", "rte")})
DEFAULTS.update(wnli=Recipe(2e-5, 5, 128), imdb=Recipe(2e-5, 3, 512),
                squad=Recipe(3e-5, 2, 384))
DEFAULT_STUDENT = "out/student"  # where `tinydistil.py pretrain` writes it
SUBSET_SEED = 0  # draws the --max-*-examples subsets: the same whatever --seed


@dataclass
class EvalConfig:
    task: str = "sst2"                        # a GLUE task, imdb, squad, or glue for all nine
    model: str = DEFAULT_STUDENT              # checkpoint folder or Hub id
    teacher: Optional[str] = None             # task model to distil from (glue: DIR/<task>)
    alpha_kd: float = 0.5                     # loss: (1 - alpha) * task + alpha * distillation
    kd_temperature: float = 2.0               # softmax temperature of the distillation term
    teacher_dtype: str = "auto"               # auto: bfloat16 where native; float32; bfloat16
    lr: Optional[float] = None                # None: the task's default (DEFAULTS)
    epochs: Optional[int] = None              # None: the task's default; 0 scores the fresh head
    batch_size: int = 32
    max_seq_len: Optional[int] = None         # None: the task's (128/512/384), at most the model's
    max_train_examples: Optional[int] = None  # None: all; else a fixed subset, the same every seed
    max_eval_examples: Optional[int] = None   # None: all; else a fixed subset, the same every seed
    seed: int = 42
    seeds: int = 1                            # runs of seeds seed, seed+1, ...: median reported
    device: str = "auto"                      # auto: cuda when available, else cpu
    dtype: str = "float32"                    # float32, or bfloat16 autocast
    data_dir: Optional[str] = None            # None: $TINYDISTIL_DATA, else ~/.cache/tinydistil
    results: str = "results.jsonl"            # one JSON line appended per task
    warmup: float = 0.1                       # fraction of the steps with linearly rising lr
    weight_decay: float = 0.01
    out: Optional[str] = None                 # save the model of --seed here (glue: DIR/<task>)
    zero_shot: bool = False                   # stsb: score the encoder as it is, no training
    pooling: Optional[str] = None             # zero-shot: mean or cls; None: the model's, else mean


# ----------------------------------------------------------------------------- settings

def check_config(cfg: EvalConfig):
    """Every setting that can be wrong without loading anything: one line each, before any work."""
    if cfg.task not in TASKS + ("glue",):
        raise UserError(f"unknown task {cfg.task!r}: use one of {', '.join(TASKS)}, "
                        f"or glue for all nine")
    positive = {"--lr": cfg.lr, "--batch-size": cfg.batch_size, "--seeds": cfg.seeds,
                "--max-train-examples": cfg.max_train_examples,
                "--max-eval-examples": cfg.max_eval_examples,
                "--kd-temperature": cfg.kd_temperature}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value}: must be positive")
    if cfg.epochs is not None and cfg.epochs < 0:
        raise UserError(f"--epochs {cfg.epochs}: must be at least 0 (0 scores the untrained head)")
    if not 0 <= cfg.alpha_kd <= 1:
        raise UserError(f"--alpha-kd {cfg.alpha_kd}: the weight of the distillation term is "
                        f"between 0 and 1")
    if not (0 <= cfg.warmup <= 1 and cfg.weight_decay >= 0):
        raise UserError(f"--warmup {cfg.warmup} must be between 0 and 1, --weight-decay "
                        f"{cfg.weight_decay} at least 0")
    if cfg.max_seq_len is not None and cfg.max_seq_len < 8:
        raise UserError(f"--max-seq-len {cfg.max_seq_len}: at least 8 tokens")
    if cfg.dtype not in DTYPES or cfg.teacher_dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype takes float32 or bfloat16, --teacher-dtype auto, float32 or "
                        f"bfloat16 (got {cfg.dtype!r}, {cfg.teacher_dtype!r})")
    pick_device(cfg.device)
    check_output_file(cfg.results, "--results")
    corpus.data_dir(cfg.data_dir)  # a --data-dir or $TINYDISTIL_DATA that is a file
    if cfg.model == DEFAULT_STUDENT and not Path(cfg.model).is_dir():
        raise UserError(f"no student at {cfg.model}: run `python tinydistil.py pretrain` first, "
                        f"or pass --model (a checkpoint folder or Hub id)")
    for flag, name in (("--model", cfg.model), ("--teacher", cfg.teacher)):
        if name is not None and looks_like_path(name) and not Path(name).expanduser().is_dir():
            raise UserError(f"{flag} {name}: no such checkpoint folder")


def _with_task_defaults(cfg: EvalConfig, encoder: BERT, teacher: Optional[TaskModel]):
    """cfg with the task's recipe filled in and max_seq_len fitted to the models' positions."""
    recipe = DEFAULTS[cfg.task]
    models = [encoder] + ([teacher.encoder] if teacher else [])
    positions = min(m.config.max_position_embeddings for m in models)
    if cfg.max_seq_len is not None and cfg.max_seq_len > positions:
        raise UserError(f"--max-seq-len {cfg.max_seq_len}: the model (or teacher) takes at most "
                        f"{positions} tokens")
    return replace(cfg, lr=cfg.lr or recipe.lr,
                   epochs=recipe.epochs if cfg.epochs is None else cfg.epochs,
                   max_seq_len=cfg.max_seq_len or min(recipe.max_seq_len, positions),
                   device=str(pick_device(cfg.device)))


# ----------------------------------------------------------------------------- data

def _subset(items, n):
    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(SUBSET_SEED).sample(range(len(items)), n))]


def _load(cfg):
    """Train items, {eval split: items}: GLUE/IMDb Examples or SQuAD example dicts."""
    if cfg.task in glue.TASKS:
        train = glue.load(cfg.task, "train", cfg.data_dir)
        evals = {s: glue.load(cfg.task, s, cfg.data_dir) for s in glue.TASKS[cfg.task].dev_splits}
    elif cfg.task == "imdb":
        train, evals = imdb.load("train", cfg.data_dir), {"test": imdb.load("test", cfg.data_dir)}
    else:
        train, evals = squad.load("train", cfg.data_dir), {"dev": squad.load("dev", cfg.data_dir)}
    return (_subset(train, cfg.max_train_examples),
            {split: _subset(items, cfg.max_eval_examples) for split, items in evals.items()})


def _collate(items, tok, cfg, regression):
    """(model inputs, targets) for a list of Examples, or of SQuAD windows (dicts, tokenized)."""
    if isinstance(items[0], dict):
        rows = range(len(items))
        ids = [np.asarray(f["input_ids"]) for f in items]
        types = [np.asarray(f["token_type_ids"]) for f in items]
        input_ids, attention_mask = data.collate(ids, rows, data.special_ids(tok)["pad"])
        x = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": data.collate(types, rows, 0)[0]}
        return x, torch.tensor([[f["start_position"], f["end_position"]] for f in items])  # (B, 2)
    pairs = [e.text_b for e in items] if items[0].text_b is not None else None
    x = data.encode_batch(tok, [e.text_a for e in items], pairs, cfg.max_seq_len)
    labels = [e.label for e in items]
    return x, torch.tensor(labels, dtype=torch.float if regression else torch.long)


# ----------------------------------------------------------------------------- training

def _task_loss(logits, y, model):
    logits = logits.float()
    if model.qa:  # mean of the start and end cross-entropies over positions
        start = F.cross_entropy(logits[..., 0], y[:, 0])
        end = F.cross_entropy(logits[..., 1], y[:, 1])
        return (start + end) / 2
    return F.mse_loss(logits[:, 0], y) if model.labels is None else F.cross_entropy(logits, y)


def train(model, items, tok, cfg, teacher_logits=None):
    """AdamW with linear warm-up and decay over cfg.epochs shuffled passes through items. With
    teacher_logits (one row per item), loss = (1 - alpha) * task loss + alpha * distillation."""
    device = next(model.parameters()).device
    model.train()
    optimizer = configure_optimizers(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = warmup_steps(total, cfg.warmup)
    order = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc=f"{cfg.task} train")
    for step in range(total):
        if step % steps_per_epoch == 0:  # a new epoch: a new order
            shuffled = torch.randperm(len(items), generator=order).tolist()
        first = (step % steps_per_epoch) * cfg.batch_size
        batch = shuffled[first:first + cfg.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, warmup)
        x, y = _collate([items[i] for i in batch], tok, cfg, model.labels is None)
        x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logits = model(**x)
        loss = _task_loss(logits, y, model)
        if teacher_logits is not None:
            t_logits = torch.from_numpy(teacher_logits[batch][:, :logits.shape[1]])  # as logits
            kd = distil.kd_term(logits, t_logits.to(device), x["attention_mask"], model,
                                 cfg.kd_temperature)
            weights = {"task": 1 - cfg.alpha_kd, "kd": cfg.alpha_kd}
            loss = total_loss({"task": loss, "kd": kd}, weights)  # alpha 0: exactly the task loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()


def predict(model, items, tok, cfg, desc, dtype=torch.float32, store=np.float32):
    """Logits of every item, in order, in one array of dtype store: (N, C), or (N, max_seq_len, 2)
    start/end for SQuAD windows (zeros past a window's end). dtype: the forward's autocast."""
    device = next(model.parameters()).device
    model.eval()
    shape = (cfg.max_seq_len, 2) if model.qa else (model.classifier.out_features,)
    out = np.zeros((len(items), *shape), dtype=store)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                         enabled=dtype == torch.bfloat16):
        for i in tqdm(range(0, len(items), cfg.batch_size), desc=desc, leave=False):
            x, _ = _collate(items[i:i + cfg.batch_size], tok, cfg, model.labels is None)
            logits = model(**{k: v.to(device) for k, v in x.items()}).float().cpu().numpy()
            out[i:i + len(logits), :logits.shape[1]] = logits  # (B, C), or (B, T, 2) of (B, L, 2)
    return out


def score(model, evals, tok, cfg):
    """The task's metrics over its eval splits, in one dict (MNLI: accuracy_m and accuracy_mm)."""
    scores = {}
    for split, items in evals.items():
        desc = f"{cfg.task} {split}"
        if cfg.task == "squad":
            windows = squad.features(items, tok, cfg.max_seq_len)
            logits = predict(model, windows, tok, cfg, desc, DTYPES[cfg.dtype])
            answers = squad.postprocess(items, windows, logits[..., 0], logits[..., 1])
            scores.update(squad.evaluate(items, answers))
            continue
        logits = predict(model, items, tok, cfg, desc, DTYPES[cfg.dtype])
        preds = logits[:, 0] if model.labels is None else logits.argmax(1)
        gold = [e.label for e in items]
        scores.update(glue.compute_metrics(cfg.task, preds, gold, split) if cfg.task in glue.TASKS
                      else {"accuracy": accuracy(preds, gold)})
    return scores


# ----------------------------------------------------------------------------- runs

def teacher_logits(teacher, items, tok, cfg):
    """The frozen teacher's logits for every training item, computed once (it has no dropout, so
    every epoch would get the same), stored as float16; and what they cost, for the results."""
    start = time.time()
    teacher.to(cfg.device)
    dtype = DTYPES.get(cfg.teacher_dtype)
    if dtype is None:  # auto: bfloat16 where the hardware multiplies it natively, as pretrain
        dtype = torch.bfloat16 if has_bfloat16_matmul(torch.device(cfg.device)) else torch.float32
    logits = predict(teacher, items, tok, cfg, f"{cfg.task} teacher", dtype, np.float16)
    teacher.cpu()
    info = {"model": cfg.teacher, "alpha_kd": cfg.alpha_kd, "temperature": cfg.kd_temperature,
            "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.time() - start, 1),
            "logits_bytes": logits.nbytes}
    return logits, info


def _fine_tune_once(cfg, encoder, train_items, evals, tok, t_logits):
    """One seed: a fresh head on a copy of the encoder, trained and scored; saved to --out when
    this is the run of --seed itself."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = task_head(cfg.task)
    model = TaskModel(copy.deepcopy(encoder), head.labels, head.qa, cfg.task).to(cfg.device)
    start = time.time()
    train(model, train_items, tok, cfg, t_logits)
    seconds = round(time.time() - start, 1)
    scores = score(model, evals, tok, cfg)
    print(f"{cfg.task} seed {cfg.seed}: {_format(scores)}")
    return model, {"seed": cfg.seed, "metrics": scores, "train_seconds": seconds}


def _format(scores):
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def _results_line(cfg, runs, teacher_info, start):
    """The task's results line: each run, and the median of each metric over them."""
    median = {k: float(np.median([r["metrics"][k] for r in runs])) for k in runs[0]["metrics"]}
    if cfg.seeds > 1:
        print(f"{cfg.task} median of {cfg.seeds} seeds: {_format(median)}")
    line = {"task": cfg.task, "model": cfg.model, "teacher": teacher_info, "metrics": median,
            "runs": runs, "seconds": round(time.time() - start, 1), "config": asdict(cfg)}
    print(json.dumps(line))
    append_line(cfg.results, json.dumps(line), "the line above is not in it: append it yourself")
    return line


def _run_task(cfg: EvalConfig) -> dict:
    start = time.time()
    if cfg.teacher:  # its config.json and tokenizer, before any data or weights are loaded
        distil.check_teacher(cfg.teacher, cfg.task, cfg.model)
    train_items, evals = _load(cfg)  # before the models: a missing dataset need not wait for them
    encoder = BERT.from_pretrained(cfg.model).without_mlm_head()
    teacher = TaskModel.from_pretrained(cfg.teacher) if cfg.teacher else None
    cfg = _with_task_defaults(cfg, encoder, teacher)
    tok = tokenizer_for(encoder)
    if cfg.task == "squad":
        train_items = squad.features(train_items, tok, cfg.max_seq_len)
    t_logits, t_info = None, None
    if teacher:  # once for every seed and epoch: the frozen teacher has no dropout
        t_logits, t_info = teacher_logits(teacher, train_items, tok, cfg)
        del teacher
    runs = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        model, result = _fine_tune_once(replace(cfg, seed=seed), encoder, train_items, evals,
                                        tok, t_logits)
        if cfg.out and seed == cfg.seed:
            model.cpu().save_pretrained(cfg.out)
        runs.append(result)
    return _results_line(cfg, runs, t_info, start)


def run(cfg: EvalConfig) -> dict:
    """Fine-tune cfg.model on cfg.task (with --seeds, once per seed), score it, append the results
    line and return it. task "glue" runs the nine GLUE tasks and returns {task: line}."""
    check_config(cfg)
    if cfg.zero_shot:  # no training at all: the encoder's own sentence embeddings
        zero_shot.check_config(cfg)
        return zero_shot.run(cfg)
    if cfg.pooling is not None:
        raise UserError("--pooling is for --zero-shot: fine-tuning uses the task's head")
    if tf32 := use_tf32(pick_device(cfg.device)):
        print(tf32)
    with FolderLock(cfg.out) if cfg.out else contextlib.nullcontext():  # one eval per --out
        return _run_tasks(cfg)


def _run_tasks(cfg: EvalConfig):
    if cfg.task != "glue":
        return _run_task(cfg)
    per_task = {t: replace(cfg, task=t, out=cfg.out and str(Path(cfg.out) / t),
                           teacher=cfg.teacher and str(Path(cfg.teacher) / t)) for t in glue.TASKS}
    for t, task_cfg in per_task.items():  # everything present before the first task trains
        if task_cfg.teacher:
            distil.check_teacher(task_cfg.teacher, t, cfg.model)
        for split in ("train",) + glue.TASKS[t].dev_splits:
            glue.path(t, split, cfg.data_dir)
    return {t: _run_task(task_cfg) for t, task_cfg in per_task.items()}
