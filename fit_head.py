"""fit_head.py: give an encoder without an MLM head one, so the paper's L_ce has soft targets.

    python tinydistil.py fit-head TEACHER --out DIR --data-dir DATA   # e.g. a sentence encoder
    python tinydistil.py fill-mask "paris is the capital of [MASK] ." --model DIR
    python tinydistil.py pretrain --teacher DIR                        # 5 L_ce + 2 L_mlm + 1 L_cos

A preparation step before distillation (paper section 2): L_ce compares the student's masked-LM
distribution with the teacher's, so the teacher needs an MLM head. Sentence encoders (all-MiniLM,
e5, bge, gte) ship without one. This fits BERT's head (transform dense + GELU, LayerNorm, and a
decoder tied to the word embeddings with a bias of its own) on the frozen encoder: the encoder
stays bit for bit as it was, the decoder is the word embedding matrix itself, and only the
transform, its LayerNorm and the decoder bias are trained, with BERT's masked-LM objective (15% of
the tokens, uniformly; of those 80% [MASK], 10% a random token, 10% kept, as data.mask_batch) on
the corpus `pretrain` reads (--data, --data-fraction, --seq-len). The frozen encoder runs in
bfloat16 where that is native (common.has_bfloat16_matmul), the head in float32.

Held out: WikiText's validation split (a text or jsonl corpus: its last HELDOUT_SHARE of
sequences, never trained on), masked once with a fixed seed, the encoder in float32. The folder
--out gets the encoder with its head in the BertForMaskedLM layout (config.json, model.safetensors,
the tokenizer, a sentence-transformers teacher's own files), and fit_head.json: heldout_loss
(nats per masked token), heldout_top1 (a fraction), the same for the untrained head, the corpus,
the steps and the config. It is written under a temporary name and renamed when complete.
studies/fit_head.md measured the defaults (steps, lr, head init) on the MiniLM teacher.
"""
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import corpus
import data
from common import UserError, has_bfloat16_matmul, looks_like_path, lr_factor, pick_device
from common import warmup_steps
from losses import L_mlm
from model import BERT, configure_optimizers

HEAD_MODULES = ("vocab_transform", "vocab_layer_norm")  # and vocab_projector.bias
HELDOUT_SHARE = 0.02  # a corpus without a validation split holds out its last 2% of sequences
HELDOUT_MASK_SEED = 0  # the held-out masking: the same for every run, so runs compare


@dataclass
class FitHeadConfig:
    teacher: Optional[str] = None        # folder or Hub id of a BERT encoder without an MLM head
    out: Optional[str] = None            # the folder written: the encoder with its fitted head
    data: str = "wikitext-2-raw"         # as pretrain: wikitext-2[-raw], -103[-raw], .txt/.jsonl
    data_fraction: float = 1.0           # keep the first fraction of the training text
    data_dir: Optional[str] = None       # default $TINYDISTIL_DATA, else ~/.cache/tinydistil
    seq_len: int = 128                   # longer texts are cut into chunks of this many tokens
    steps: int = 300                     # optimizer steps (studies/fit_head.md)
    batch_size: int = 32                 # sequences per step
    lr: float = 2e-3                     # peak learning rate of AdamW (studies/fit_head.md)
    warmup: float = 0.05                 # fraction of the steps with linear warm-up
    bias_init: str = "unigram"           # decoder bias: unigram (log frequency) or zeros (BERT's)
    mlm_mask_prop: float = 0.15          # fraction of the tokens predicted, as BERT
    heldout_sequences: int = 512         # at most this many held-out sequences are scored
    log_every: int = 100                 # steps between two log lines
    seed: int = 0
    device: str = "auto"                 # auto (cuda if present), cpu, cuda, cuda:1, ...
    overwrite: bool = False              # replace --out if it already exists


def check_config(cfg: FitHeadConfig):
    """Every setting that can be judged before anything loads: one line for the first wrong one."""
    rules = [
        (bool(cfg.teacher), "give the encoder to fit a head on: fit-head TEACHER --out DIR"),
        (bool(cfg.out), "give --out DIR: the folder the encoder with its head is written to"),
        (cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.log_every >= 1,
         "--steps, --batch-size and --log-every must be at least 1"),
        (cfg.lr > 0, f"--lr {cfg.lr}: the learning rate must be positive"),
        (0 <= cfg.warmup < 1, f"--warmup {cfg.warmup}: give a fraction in [0, 1)"),
        (0 < cfg.data_fraction <= 1, f"--data-fraction {cfg.data_fraction}: give one in (0, 1]"),
        (cfg.seq_len >= data.MIN_LEN, f"--seq-len {cfg.seq_len}: at least {data.MIN_LEN}"),
        (0 < cfg.mlm_mask_prop < 1, f"--mlm-mask-prop {cfg.mlm_mask_prop}: a fraction in (0, 1)"),
        (cfg.heldout_sequences >= 1, "--heldout-sequences must be at least 1"),
        (cfg.bias_init in ("unigram", "zeros"), "--bias-init takes unigram or zeros"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    if looks_like_path(cfg.teacher) and not Path(cfg.teacher).expanduser().is_dir():
        raise UserError(f"{cfg.teacher}: no such checkpoint folder")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out {out} exists: choose another folder or pass --overwrite")
    pick_device(cfg.device)


# ----------------------------------------------------------------------------- the model

def with_new_head(encoder: BERT) -> BERT:
    """A copy of encoder with BERT's MLM head: the decoder tied to its word embeddings, the rest of
    the head freshly initialised; every encoder parameter frozen, the head's own ones trainable."""
    model = BERT(replace(encoder.config, mlm_head=True))
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(HEAD_MODULES + ("vocab_projector",))
                                  for k in missing), (missing, unexpected)
    model.source_dir = encoder.source_dir
    model.requires_grad_(False)
    for name in HEAD_MODULES:
        getattr(model, name).requires_grad_(True)
    model.vocab_projector.bias.requires_grad_(True)  # the weight is the (frozen) word embeddings
    return model


def unigram_bias(seqs, vocab_size, special) -> torch.Tensor:
    """log p(token) from the corpus counts (an unseen token counted once): the head's best guess
    before it sees the context, a start that saves steps spent learning word frequencies. (V,)"""
    weights = data.mask_weights(seqs, vocab_size, special, smoothing=1.0)  # 1 / max(count, 1)
    counts = 1.0 / weights.double()
    counts[list(special)] = 1.0
    return (counts / counts.sum()).log().float()


# ----------------------------------------------------------------------------- data

def load_splits(cfg, tok):
    """(train sequences, their indices, held-out sequences, held-out indices, held-out name)."""
    root = corpus.data_dir(cfg.data_dir)
    train = corpus.load_corpus(cfg.data, tok, root, data_fraction=cfg.data_fraction,
                               seq_len=cfg.seq_len)
    if cfg.data in corpus.WIKITEXT:
        heldout = corpus.load_corpus(cfg.data, tok, root, data_fraction=1.0, seq_len=cfg.seq_len,
                                     split="valid")
        train_idx, heldout_idx, name = np.arange(len(train)), np.arange(len(heldout)), "valid"
    else:  # no validation split: the tail of the corpus, left out of training
        n_held = max(1, math.ceil(HELDOUT_SHARE * len(train)))
        if len(train) - n_held < 1:
            raise UserError(f"--data {cfg.data} has {len(train)} sequences: too few to hold "
                            f"{n_held} out and train on the rest")
        heldout, name = train, f"the last {n_held} sequences"
        train_idx, heldout_idx = np.arange(len(train) - n_held), np.arange(len(train) - n_held,
                                                                            len(train))
    return train, train_idx, heldout, heldout_idx[:cfg.heldout_sequences], name


def masked_batch(seqs, idx, special, weights, vocab_size, gen, cfg, device):
    """One batch of sequences, masked as BERT's MLM: (input_ids, attention_mask, labels)."""
    input_ids, attention_mask = (t.to(device) for t in data.collate(seqs, idx, special["pad"]))
    input_ids, labels = data.mask_batch(input_ids, attention_mask, weights, special["mask"],
                                        vocab_size, gen, cfg.mlm_mask_prop)
    return input_ids, attention_mask, labels


def head_loss(model, input_ids, attention_mask, labels, dtype):
    """The MLM loss and the number of correct top-1 predictions on the predicted positions; the
    frozen encoder runs without gradients (in dtype), the head in float32 on those rows only."""
    device = input_ids.device.type
    with torch.no_grad(), torch.autocast(device, dtype, enabled=dtype != torch.float32):
        hidden = model(input_ids, attention_mask, return_logits=False).hidden_states[-1]
    predicted = labels != -100  # (B, T)
    logits = model.mlm_logits(hidden[predicted].float())  # (N, V)
    targets = labels[predicted]  # (N,)
    return L_mlm(logits, targets), int((logits.argmax(-1) == targets).sum()), len(targets)


def evaluate(model, heldout, idx, special, weights, cfg, device):
    """Held-out MLM loss (nats per masked token) and top-1 accuracy, masked with a fixed seed, the
    encoder in float32."""
    gen = torch.Generator(device).manual_seed(HELDOUT_MASK_SEED)
    loss_sum, correct, total = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in tqdm(range(0, len(idx), cfg.batch_size), desc="held-out", leave=False):
            batch = masked_batch(heldout, idx[i:i + cfg.batch_size].tolist(), special, weights,
                                 model.config.vocab_size, gen, cfg, device)
            loss, right, n = head_loss(model, *batch, torch.float32)
            loss_sum, correct, total = loss_sum + loss.item() * n, correct + right, total + n
    return {"loss": loss_sum / total, "top1": correct / total, "masked_tokens": total}


# ----------------------------------------------------------------------------- the fit

def train_head(model, train, train_idx, special, weights, cfg, device):
    """AdamW on the head's parameters, linear warm-up and decay, dynamic masking (a new mask for
    every batch). Returns the mean training loss of the last log interval."""
    dtype = torch.bfloat16 if has_bfloat16_matmul(device) else torch.float32
    params = [p for p in model.parameters() if p.requires_grad]
    opt = configure_optimizers(model, cfg.lr, 0.0)
    batches = data.Batches(train.lengths[train_idx], cfg.batch_size, cfg.seed).stream()
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    warmup, sums, t0 = warmup_steps(cfg.steps, cfg.warmup), [0.0, 0, 0], time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="fit-head")
    for step in range(1, cfg.steps + 1):
        _, _, idx = next(batches)
        batch = masked_batch(train, train_idx[idx].tolist(), special, weights,
                             model.config.vocab_size, gen, cfg, device)
        loss, right, n = head_loss(model, *batch, dtype)
        lr = cfg.lr * lr_factor(step - 1, cfg.steps, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sums = [sums[0] + loss.item(), sums[1] + right, sums[2] + n]
        bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps:
            steps_done = step % cfg.log_every or cfg.log_every
            ms = 1000 * (time.perf_counter() - t0) / steps_done
            bar.write(f"step {step:5d}/{cfg.steps} | loss {sums[0] / steps_done:.4f} | top-1 "
                      f"{sums[1] / max(1, sums[2]):.3f} | lr {lr:.2e} | {ms:.0f} ms/step")
            last, sums, t0 = sums[0] / steps_done, [0.0, 0, 0], time.perf_counter()
    bar.close()
    return last


def write_folder(model, cfg, report):
    """The encoder with its head, the teacher's sentence-transformers files and fit_head.json,
    written beside --out and renamed into place when complete (an --overwrite'n folder last)."""
    from tasks.zero_shot import copy_sentence_transformers_files
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        copy_sentence_transformers_files(model.source_dir, tmp)
        (tmp / "fit_head.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {out} ({e}): free some disk space or choose another "
                            f"--out; nothing was written") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def fit_head(cfg: FitHeadConfig) -> dict:
    """Fit an MLM head on the frozen cfg.teacher, write cfg.out; returns fit_head.json's dict."""
    check_config(cfg)
    start, device = time.time(), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder = BERT.from_pretrained(cfg.teacher)
    if encoder.config.mlm_head:
        raise UserError(f"{cfg.teacher} already has an MLM head: use it as the teacher as it is")
    tok = data.load_tokenizer(encoder.source_dir)
    special = data.special_ids(tok)
    train, train_idx, heldout, heldout_idx, heldout_name = load_splits(cfg, tok)
    print(f"data {cfg.data}: {len(train_idx)} training sequences, {len(heldout_idx)} held out "
          f"({heldout_name}); encoder frozen, head trained for {cfg.steps} steps of "
          f"{cfg.batch_size} sequences, lr {cfg.lr:g}")
    model = with_new_head(encoder).to(device)
    del encoder
    vocab = model.config.vocab_size
    weights = data.mask_weights(train, vocab, special.values(), smoothing=0.0)  # BERT's: uniform
    if cfg.bias_init == "unigram":
        with torch.no_grad():
            model.vocab_projector.bias.copy_(unigram_bias(train, vocab, special.values()))
    before = evaluate(model, heldout, heldout_idx, special, weights, cfg, device)
    print(f"held-out before: loss {before['loss']:.4f} | top-1 {before['top1']:.4f}")
    train_loss = train_head(model, train, train_idx, special, weights, cfg, device)
    after = evaluate(model, heldout, heldout_idx, special, weights, cfg, device)
    print(f"held-out after: loss {after['loss']:.4f} | top-1 {after['top1']:.4f} "
          f"({after['masked_tokens']} masked tokens)")
    report = {"teacher": cfg.teacher, "heldout_loss": after["loss"], "heldout_top1": after["top1"],
              "heldout_masked_tokens": after["masked_tokens"],
              "initial_heldout_loss": before["loss"], "initial_heldout_top1": before["top1"],
              "train_loss": train_loss, "steps": cfg.steps,
              "corpus": {"data": cfg.data, "data_fraction": cfg.data_fraction,
                         "seq_len": cfg.seq_len, "train_sequences": len(train_idx),
                         "heldout": heldout_name, "heldout_sequences": len(heldout_idx)},
              "seconds": round(time.time() - start, 1), "config": asdict(cfg)}
    write_folder(model.cpu(), cfg, report)
    print(f"saved {cfg.out}: the encoder unchanged, its MLM head fitted; distil from it with "
          f"python tinydistil.py pretrain --teacher {cfg.out}")
    return report
