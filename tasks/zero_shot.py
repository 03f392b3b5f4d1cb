"""zero_shot.py: score an encoder as it is, with no training: zero-shot STS-B, and the
sentence-transformers files that say how a sentence encoder pools.

    python tinydistil.py eval stsb --zero-shot --model out/student            # mean pooling
    python tinydistil.py eval stsb --zero-shot --model out/student --pooling cls
    from tasks.zero_shot import zero_shot_sts
    zero_shot_sts("out/student", data_dir)    # {"spearman": 0.8672, "pearson": ..., ...}

Fine-tuning hides much of what distillation did to an encoder: a task head trained on thousands of
labelled examples can make up for a lot (studies/retention.md). Zero-shot STS-B reads the encoder
directly, the way sentence-transformers' EmbeddingSimilarityEvaluator and MTEB score STSBenchmark:
each sentence's embedding is the mean of the last hidden state over its real tokens (--pooling
mean) or the [CLS] state (--pooling cls); a pair's predicted similarity is the cosine of its two
embeddings; the score is the Spearman (and Pearson) correlation of those cosines with the gold
scores over all 1,500 STS-B dev pairs. Nothing is trained or drawn at random: deterministic.

A folder saved by sentence-transformers says how its model pools (modules.json, 1_Pooling/
config.json); without --pooling that is what the score uses, else mean. `pretrain` copies these
files from such a teacher into its student (copy_sentence_transformers_files), so
SentenceTransformer(student) embeds exactly as this scores it. A Normalize module changes no cosine.
"""
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from common import DTYPES, UserError, append_line, pick_device
from model import BERT
from tasks import glue
from tasks.heads import tokenizer_for
from tasks.metrics import pearson, spearman

POOLINGS = ("mean", "cls")
# 1_Pooling/config.json's flag for each pooling we compute; any other mode set there is refused.
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
# sentence-transformers modules a student can carry over as they are: the encoder (the folder
# itself), the pooling, and the unit-length normalisation (which changes no cosine).
CARRIED_MODULES = {"sentence_transformers.models.Transformer",
                   "sentence_transformers.models.Pooling",
                   "sentence_transformers.models.Normalize"}
TOP_LEVEL_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


# ------------------------------------------------------------------- sentence-transformers

def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or delete it") from None


def _modules(folder: Path):
    """modules.json's list of modules; None when the folder is not a sentence-transformers one."""
    path = Path(folder) / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m
                                                for m in modules):
        raise UserError(f"{path}: expected a list of modules with a 'type' each")
    return modules


def sentence_transformers_pooling(folder):
    """The pooling ("mean" or "cls") a sentence-transformers folder declares, or None when the
    folder has no modules.json or no Pooling module. Other modes (max, weighted...) are refused."""
    modules = _modules(Path(folder))
    pooling = [m for m in modules or [] if m["type"].endswith(".Pooling")]
    if not pooling:
        return None
    path = Path(folder) / pooling[0].get("path", "1_Pooling") / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: modules.json lists a Pooling module there")
    config = _read_json(path)
    on = [key for key, value in config.items() if key.startswith("pooling_mode") and value is True]
    modes = [name for name, flag in POOLING_FLAGS.items() if on == [flag]]
    if not modes:
        raise UserError(f"{path}: pooling {', '.join(on) or 'none'} is not one this scores "
                        f"(mean or cls): pass --pooling")
    return modes[0]


def sentence_transformers_max_len(folder):
    """sentence_bert_config.json's max_seq_length (the sentence encoder's truncation), or None."""
    path = Path(folder) / "sentence_bert_config.json"
    return _read_json(path).get("max_seq_length") if path.is_file() else None


def copy_sentence_transformers_files(src, dst) -> list:
    """Copy a sentence-transformers teacher's own files (modules.json, sentence_bert_config.json,
    config_sentence_transformers.json, the Pooling and Normalize folders) into a student folder, so
    the student loads as SentenceTransformer(dst) and pools as its teacher. Returns the paths
    copied (relative); nothing when src is not such a folder, or has a module (Dense...) whose
    weights would not fit the student."""
    src, dst = Path(src), Path(dst)
    modules = _modules(src)
    if not modules or any(m["type"] not in CARRIED_MODULES for m in modules):
        return []
    names = [name for name in TOP_LEVEL_FILES if (src / name).is_file()]
    for m in modules:
        folder = src / m.get("path", "")
        if m.get("path") and folder.is_dir():
            names += [str(p.relative_to(src)) for p in sorted(folder.rglob("*")) if p.is_file()]
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
    return names


# ----------------------------------------------------------------------------- embeddings

def pool(hidden, attention_mask, pooling):
    """Sentence embeddings from the last hidden state (B, T, H): the mean over real tokens, or the
    [CLS] token's state. (B, H)"""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(encoder, tok, sentences, pooling="mean", max_seq_len=128, batch_size=32,
          dtype=torch.float32, desc="embed"):
    """One float32 embedding per sentence, in order. (N, H) numpy. Sentences are run shortest
    first, so a batch pads little; eval mode, so nothing is random."""
    device = next(encoder.parameters()).device
    encoder.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = np.zeros((len(sentences), encoder.config.hidden_size), dtype=np.float32)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                         enabled=dtype == torch.bfloat16):
        for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            rows = order[i:i + batch_size]
            x = data.encode_batch(tok, [sentences[r] for r in rows], max_len=max_seq_len)
            ids, mask = x["input_ids"].to(device), x["attention_mask"].to(device)
            hidden = encoder(ids, mask, return_logits=False).hidden_states[-1]  # (B, T, H)
            out[rows] = pool(hidden.float(), mask, pooling).cpu().numpy()
    return out


def cosine(a, b):
    """Row-wise cosine similarity of two (N, H) arrays, in float64. (N,)"""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-12)


# ----------------------------------------------------------------------------- the score

def zero_shot_sts(model_dir, data_dir=None, pooling=None, max_seq_len=None, batch_size=32,
                  device="cpu", dtype=torch.float32, encoder=None) -> dict:
    """Zero-shot STS-B dev of a model folder (or Hub id): {"spearman", "pearson"} (correlations in
    -1..1, as every metric here), "pooling", "pairs", "max_seq_len". pooling None: the folder's
    sentence-transformers pooling, else mean. encoder: an already loaded BERT of that folder."""
    if pooling is not None and pooling not in POOLINGS:
        raise UserError(f"--pooling {pooling!r}: use {' or '.join(POOLINGS)}")
    pairs = glue.load("stsb", "dev", data_dir)  # a missing dataset fails before the model loads
    if encoder is None:
        encoder = BERT.from_pretrained(model_dir)
    folder = encoder.source_dir
    pooling = pooling or (folder and sentence_transformers_pooling(folder)) or "mean"
    positions = encoder.config.max_position_embeddings
    max_seq_len = min(max_seq_len or (folder and sentence_transformers_max_len(folder)) or 512,
                      positions)
    encoder = encoder.to(pick_device(device) if isinstance(device, str) else device)
    tok = tokenizer_for(encoder)
    sentences = sorted({s for e in pairs for s in (e.text_a, e.text_b)})  # each one embedded once
    vectors = embed(encoder, tok, sentences, pooling, max_seq_len, batch_size, dtype,
                    desc="stsb zero-shot")
    row = {s: i for i, s in enumerate(sentences)}
    sims = cosine(vectors[[row[e.text_a] for e in pairs]], vectors[[row[e.text_b] for e in pairs]])
    gold = [e.label for e in pairs]
    return {"spearman": spearman(sims, gold), "pearson": pearson(sims, gold), "pooling": pooling,
            "pairs": len(pairs), "max_seq_len": max_seq_len}


def check_config(cfg):
    """The settings --zero-shot allows: STS-B, no teacher, float32 or bfloat16."""
    if cfg.task != "stsb":
        raise UserError(f"--zero-shot scores STS-B (eval stsb --zero-shot), not {cfg.task}")
    if cfg.teacher is not None or cfg.out is not None:
        raise UserError("--zero-shot trains nothing: --teacher and --out do not apply")
    if cfg.pooling is not None and cfg.pooling not in POOLINGS:
        raise UserError(f"--pooling {cfg.pooling!r}: use {' or '.join(POOLINGS)}")


def run(cfg) -> dict:
    """`eval stsb --zero-shot`: score cfg.model, append one results line and return it."""
    start = time.time()
    result = zero_shot_sts(cfg.model, cfg.data_dir, cfg.pooling, cfg.max_seq_len, cfg.batch_size,
                           cfg.device, DTYPES[cfg.dtype])
    metrics = {"spearman": result["spearman"], "pearson": result["pearson"]}
    print(f"stsb zero-shot ({result['pooling']} pooling, {result['pairs']} dev pairs): "
          f"Spearman {100 * metrics['spearman']:.2f}, Pearson {100 * metrics['pearson']:.2f}")
    line = {"task": "stsb", "model": cfg.model, "zero_shot": True, "pooling": result["pooling"],
            "metrics": metrics, "pairs": result["pairs"], "seconds": round(time.time() - start, 1),
            "config": {**asdict(cfg), "pooling": result["pooling"],
                       "max_seq_len": result["max_seq_len"]}}
    print(json.dumps(line))
    append_line(cfg.results, json.dumps(line), "the line above is not in it: append it yourself")
    return line
