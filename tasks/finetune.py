"""tasks/finetune.py: fine-tune an encoder on one downstream task of the paper and score it.

    python tinydistil.py eval sst2 --model out/student          # fine-tune on train, score on dev
    python tinydistil.py eval glue --model bert-base-uncased    # the nine GLUE tasks, one results line each
    python tinydistil.py report                                 # Tables 1 and 2 from results.jsonl

Paper section 4 and 4.1, Tables 1 and 2: every model is fine-tuned per task and scored on GLUE dev
(MNLI: matched and mismatched), IMDb test and SQuAD v1.1 dev. The heads are those of the reference
classes, so a saved model (--out) loads in transformers unchanged: a BERT checkpoint classifies its
tanh pooler output (BertForSequenceClassification; a checkpoint without pooler gets a fresh one), a
DistilBERT/student its [CLS] state through pre_classifier, ReLU, dropout 0.2 and classifier
(DistilBertForSequenceClassification); STS-B is a 1-output regression with MSE; SQuAD puts start/end
logits on every token (qa_outputs). Training: AdamW (weight decay 0.01, none on biases and LayerNorm),
linear warmup then decay, gradient clipping at 1.0, batches shuffled with the seed and padded to
their longest sequence. `eval glue` first makes sure all nine datasets are present (downloading the
missing ones), so a missing one stops the run with its message before any training; then each task
appends its own line (and, with --out DIR, is saved to DIR/<task>).
"""
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from common import UserError
from model import BERT
from tasks import glue, imdb, metrics, squad

GLUE = tuple(glue.TASKS)
TASKS = GLUE + ("imdb", "squad")
# task -> (lr, epochs, max_seq_len). BERT's recipe (3 epochs, lr 2e-5..5e-5); the small tasks get 5 epochs.
DEFAULTS = {t: (2e-5, 3, 128) for t in ("sst2", "qqp", "mnli", "qnli")}
DEFAULTS.update({t: (3e-5, 5, 128) for t in ("cola", "mrpc", "stsb", "rte")})
DEFAULTS.update(wnli=(2e-5, 5, 128), imdb=(2e-5, 3, 512), squad=(3e-5, 2, 384))
SEQ_CLASSIF_DROPOUT, QA_DROPOUT = 0.2, 0.1  # DistilBERT's defaults; model.py's to_hf writes the same


@dataclass
class EvalConfig:
    task: str = "sst2"                        # a GLUE task, imdb, squad, or glue for all nine
    model: str = "out/student"                # Hub id or checkpoint folder
    lr: Optional[float] = None                # None: the task's default (DEFAULTS)
    epochs: Optional[int] = None              # None: the task's default; 0 scores the untrained head
    batch_size: int = 32
    max_seq_len: Optional[int] = None         # None: 128 GLUE, 512 IMDb, 384 SQuAD (at most the model's)
    max_train_examples: Optional[int] = None  # None: all; else a random subset drawn with the seed
    max_eval_examples: Optional[int] = None   # None: all; else a fixed random subset (same for every seed)
    seed: int = 42
    device: str = "auto"                      # auto: cuda when available, else cpu
    dtype: str = "float32"                    # float32, or bfloat16 autocast
    data_dir: Optional[str] = None            # None: $TINYDISTIL_DATA, else ~/.cache/tinydistil
    results: str = "results.jsonl"            # one JSON line appended per task
    warmup: float = 0.1                       # fraction of the steps with linearly rising lr
    weight_decay: float = 0.01
    out: Optional[str] = None                 # save the fine-tuned model here (glue: out/<task>)


class TaskModel(nn.Module):
    """An encoder plus the task head of the reference *ForSequenceClassification/*ForQuestionAnswering.
    labels: label names (classification), None for regression (1 output); qa: start/end logits instead."""

    def __init__(self, encoder: BERT, labels=None, qa=False):
        super().__init__()
        H, std = encoder.config.hidden_size, encoder.config.initializer_range
        self.bert = encoder.config.model_type == "bert"
        self.labels, self.qa = None if qa or labels is None else list(labels), qa
        # The reference classes have no MLM head, and BertForQuestionAnswering no pooler: drop them so
        # they are neither trained nor saved; classification on a pooler-less BERT gets a fresh pooler.
        encoder.config = replace(encoder.config, mlm_head=False, pooler=self.bert and not qa)
        for name in ("vocab_transform", "vocab_layer_norm", "vocab_projector"):
            encoder._modules.pop(name, None)
        fresh = []
        if encoder.config.pooler and encoder.pooler is None:
            encoder.pooler = nn.ModuleDict({"dense": nn.Linear(H, H)})
            fresh.append(encoder.pooler.dense)
        encoder.pooler = encoder.pooler if encoder.config.pooler else None
        self.encoder = encoder
        if qa:
            self.dropout = nn.Dropout(0.0 if self.bert else QA_DROPOUT)
            self.qa_outputs = nn.Linear(H, 2)
        else:
            if not self.bert:
                self.pre_classifier = nn.Linear(H, H)
            self.dropout = nn.Dropout(encoder.config.dropout if self.bert else SEQ_CLASSIF_DROPOUT)
            self.classifier = nn.Linear(H, len(self.labels) if self.labels else 1)
        for m in fresh + [m for n, m in self.named_children() if n != "encoder"]:
            if isinstance(m, nn.Linear):  # as the reference's _init_weights
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Logits: (B, num_labels), (B, 1) for regression, (B, T, 2) start/end for QA. Token types are
        dropped for models without them (the student), so callers may always pass them."""
        types = token_type_ids if self.encoder.config.type_vocab_size else None
        out = self.encoder(input_ids, attention_mask, types, return_logits=False)
        if self.qa:
            return self.qa_outputs(self.dropout(out.hidden_states[-1]))
        if self.bert:
            return self.classifier(self.dropout(out.pooler_output))
        return self.classifier(self.dropout(F.relu(self.pre_classifier(out.hidden_states[-1][:, 0]))))

    def save_pretrained(self, out):
        """config.json + model.safetensors (+ tokenizer files) in the reference task-model layout."""
        enc = self.encoder.state_dict()
        tensors = {theirs: enc[ours] for ours, theirs in self.encoder.checkpoint_names().items()}
        tensors.update({k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")})
        config = self.encoder.config.to_hf()
        kind = "QuestionAnswering" if self.qa else "SequenceClassification"
        config["architectures"] = [("Bert" if self.bert else "DistilBert") + "For" + kind]
        if not self.qa:
            names = self.labels or ["LABEL_0"]
            config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                          problem_type="single_label_classification" if self.labels else "regression")
        self.encoder.save_pretrained(out, tensors, config)

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """A folder (or Hub id) written by save_pretrained or by the reference library's task classes."""
        encoder, unused = BERT.from_pretrained(name_or_dir, return_unused=True)
        hf = json.loads((encoder.source_dir / "config.json").read_text())
        arch = (hf.get("architectures") or ["an encoder"])[0]
        if not arch.endswith(("ForSequenceClassification", "ForQuestionAnswering")):
            raise UserError(f"{name_or_dir} is {arch}, not a fine-tuned task model: make one with "
                            f"`python tinydistil.py eval TASK --out DIR`")
        id2label = hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
        regression = hf.get("problem_type") == "regression" or len(id2label) == 1
        labels = None if regression else [id2label[str(i)] for i in range(len(id2label))]
        model = cls(encoder, labels, qa=arch.endswith("ForQuestionAnswering"))
        head = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        if set(head) != set(unused):
            raise UserError(f"{name_or_dir}: a {arch} needs the head tensors {sorted(head)}, "
                            f"the file has {sorted(unused)}")
        with torch.no_grad():
            for k, v in head.items():
                if v.shape != unused[k].shape:
                    raise UserError(f"{name_or_dir}: {k} has shape {list(unused[k].shape)}, "
                                    f"config.json implies {list(v.shape)}")
                v.copy_(unused[k].float())
        return model.eval()


def tokenizer_for(model: TaskModel):
    if model.encoder.source_dir is None:
        raise UserError("this model was built without a checkpoint folder, so it has no tokenizer: "
                        "save_pretrained it and load it back, or give a checkpoint folder")
    return data.load_tokenizer(model.encoder.source_dir)


def _subset(items, n, seed):
    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _load(cfg):
    """Train items, {eval split: items}: GLUE/IMDb Examples or SQuAD example dicts."""
    if cfg.task in GLUE:
        train = glue.load(cfg.task, "train", cfg.data_dir)
        evals = {s: glue.load(cfg.task, s, cfg.data_dir) for s in glue.TASKS[cfg.task].dev_splits}
    elif cfg.task == "imdb":
        train, evals = imdb.load("train", cfg.data_dir), {"test": imdb.load("test", cfg.data_dir)}
    else:
        train, evals = squad.load("train", cfg.data_dir), {"dev": squad.load("dev", cfg.data_dir)}
    return (_subset(train, cfg.max_train_examples, cfg.seed),
            {s: _subset(v, cfg.max_eval_examples, 0) for s, v in evals.items()})


def _collate(items, tok, cfg, regression):
    """(model inputs, targets) for a list of Examples, or of SQuAD features (dicts)."""
    if isinstance(items[0], dict):
        T, pad = max(len(f["input_ids"]) for f in items), data.special_ids(tok)["pad"]
        row = lambda xs, fill: xs + [fill] * (T - len(xs))
        x = {"input_ids": torch.tensor([row(f["input_ids"], pad) for f in items]),
             "attention_mask": torch.tensor([row([1] * len(f["input_ids"]), 0) for f in items]),
             "token_type_ids": torch.tensor([row(f["token_type_ids"], 0) for f in items])}
        return x, torch.tensor([[f["start_position"], f["end_position"]] for f in items])  # (B, 2)
    pairs = [e.text_b for e in items] if items[0].text_b is not None else None
    x = data.encode_batch(tok, [e.text_a for e in items], pairs, cfg.max_seq_len)
    return x, torch.tensor([e.label for e in items], dtype=torch.float if regression else torch.long)


def _loss(logits, y, model):
    logits = logits.float()
    if model.qa:  # mean of the start and end cross-entropies over positions
        return (F.cross_entropy(logits[..., 0], y[:, 0]) + F.cross_entropy(logits[..., 1], y[:, 1])) / 2
    return F.mse_loss(logits[:, 0], y) if model.labels is None else F.cross_entropy(logits, y)


def _resolve(cfg):
    """cfg with the task's defaults filled in (max_seq_len is capped once the model is loaded)."""
    if cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r}: use one of {', '.join(TASKS)}, or glue for all nine")
    if cfg.dtype not in ("float32", "bfloat16") or cfg.batch_size < 1:
        raise UserError(f"--dtype must be float32 or bfloat16 and --batch-size positive "
                        f"(got {cfg.dtype!r}, {cfg.batch_size})")
    if 0 in (cfg.max_train_examples, cfg.max_eval_examples) or (cfg.epochs or 0) < 0:
        raise UserError("--max-train-examples and --max-eval-examples must be positive, --epochs at least 0")
    lr, epochs, _ = DEFAULTS[cfg.task]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {device!r} is not usable here ({e}): use auto, cpu or cuda") from None
    return replace(cfg, lr=lr if cfg.lr is None else cfg.lr, device=device,
                   epochs=epochs if cfg.epochs is None else cfg.epochs)


def _predict(model, items, tok, cfg, desc):
    """Logits of every item, in order, as float32 numpy rows (QA rows keep their batch's padding)."""
    device = next(model.parameters()).device
    model.eval()
    rows = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        for i in tqdm(range(0, len(items), cfg.batch_size), desc=desc, leave=False):
            x, _ = _collate(items[i:i + cfg.batch_size], tok, cfg, model.labels is None)
            rows.extend(model(**{k: v.to(device) for k, v in x.items()}).float().cpu().numpy())
    return rows


def train(model, items, tok, cfg):
    """AdamW with linear warmup and decay over cfg.epochs shuffled passes through items."""
    device = next(model.parameters()).device
    model.train()
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in no_decay],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}],
                            lr=cfg.lr, fused=True)  # the CPU default loops over tensors, several times slower
    total = -(-len(items) // cfg.batch_size) * cfg.epochs
    warmup = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc=f"{cfg.task} train")
    for _ in range(cfg.epochs):
        order = torch.randperm(len(items), generator=g).tolist()
        for i in range(0, len(items), cfg.batch_size):
            x, y = _collate([items[j] for j in order[i:i + cfg.batch_size]], tok, cfg, model.labels is None)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                loss = _loss(model(**{k: v.to(device) for k, v in x.items()}), y.to(device), model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()


def score(model, evals, tok, cfg):
    """The task's metrics over its eval splits, in one dict (MNLI: accuracy_m and accuracy_mm)."""
    scores = {}
    for split, items in evals.items():
        if cfg.task == "squad":
            feats = squad.features(items, tok, cfg.max_seq_len)
            rows = _predict(model, feats, tok, cfg, f"{cfg.task} {split}")
            preds = squad.postprocess(items, feats, [r[:, 0] for r in rows], [r[:, 1] for r in rows])
            scores.update(squad.evaluate(items, preds))
            continue
        rows = np.array(_predict(model, items, tok, cfg, f"{cfg.task} {split}"))
        preds, gold = (rows[:, 0] if model.labels is None else rows.argmax(1)), [e.label for e in items]
        scores.update(glue.compute_metrics(cfg.task, preds, gold, split) if cfg.task in GLUE
                      else {"accuracy": metrics.accuracy(preds, gold)})
    return scores


def run(cfg: EvalConfig) -> dict:
    """Fine-tune cfg.model on cfg.task, score it, append the results line and return it.
    task "glue" runs the nine GLUE tasks and returns {task: line}."""
    if cfg.task == "glue":
        for t in GLUE:
            for split in ("train",) + glue.TASKS[t].dev_splits:
                glue.path(t, split, cfg.data_dir)
        return {t: run(replace(cfg, task=t, out=cfg.out and str(Path(cfg.out) / t))) for t in GLUE}
    start = time.time()
    cfg = _resolve(cfg)
    train_items, evals = _load(cfg)  # before the model: a missing dataset should not wait for a download
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    labels = glue.TASKS[cfg.task].labels if cfg.task in GLUE else ("neg", "pos") if cfg.task == "imdb" else None
    model = TaskModel(BERT.from_pretrained(cfg.model), labels, qa=cfg.task == "squad")
    positions = model.encoder.config.max_position_embeddings
    if cfg.max_seq_len is not None and not 8 <= cfg.max_seq_len <= positions:
        raise UserError(f"--max-seq-len {cfg.max_seq_len}: this model takes 8 to {positions} tokens")
    cfg = replace(cfg, max_seq_len=cfg.max_seq_len or min(DEFAULTS[cfg.task][2], positions))
    tok = tokenizer_for(model)
    if cfg.task == "squad":
        train_items = squad.features(train_items, tok, cfg.max_seq_len)
    train(model.to(cfg.device), train_items, tok, cfg)
    scores = score(model, evals, tok, cfg)
    if cfg.out:
        model.cpu().save_pretrained(cfg.out)
    line = {"task": cfg.task, "model": cfg.model, "metrics": scores,
            "seconds": round(time.time() - start, 1), "config": asdict(cfg)}
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))
    return line
