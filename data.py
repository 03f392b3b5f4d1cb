"""Pretraining data for distillation: corpus, tokenizer, length-grouped batches and MLM masking.

Implements the data side of DistilBERT (Sanh et al. 2019), section 3 "Distillation" and "Data and
compute power": one coherent text per sequence, dynamic masking, batches grouped by length. It follows
the reference code (transformers examples/research_projects/distillation): scripts/binarized_data.py
and lm_seqs_dataset.py build the sequences, token_counts.py and train.py the `mlm_smoothing` token
probabilities, grouped_batch_sampler.py the batches and distiller.py `prepare_batch_mlm` the masking.

Used by `python tinydistil.py pretrain`; the tests are `python -m pytest -q test_all.py`.

    tok = load_tokenizer(teacher_folder)
    seqs = load_corpus("wikitext-2-raw", tok, data_dir(args.data_dir), data_fraction=0.1, seq_len=128)
    probs = token_probs(seqs, vocab_size, special_ids(tok).values())
    batches = Batches(seqs.lengths, batch_size=16, seed=0, rank=0, world_size=1)
    for epoch, i, idx in batches.stream():
        input_ids, attention_mask = collate(seqs, idx, pad_id)
        input_ids, labels = mask_batch(input_ids, attention_mask, probs, mask_id, vocab_size, generator)
"""
import hashlib
import json
import math
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import BertWordPieceTokenizer, Tokenizer

from common import UserError
from hub import fetch_url

WIKITEXT_URL = "https://wikitext.smerity.com/"  # the original S3 bucket is gone; same archives here
# the WikiText host refuses Python's default User-Agent
BROWSER_HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                                 "(KHTML, like Gecko) Chrome/120.0 Safari/537.36"}
# --data name -> (archive, folder inside the archive and under data_dir, file name pattern)
WIKITEXT = {
    "wikitext-2-raw": ("wikitext-2-raw-v1.zip", "wikitext-2-raw", "wiki.{split}.raw"),
    "wikitext-2": ("wikitext-2-v1.zip", "wikitext-2", "wiki.{split}.tokens"),
}
WIKITEXT_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MIN_LEN = 12  # the reference drops sequences of 11 tokens or fewer
CACHE_VERSION = 1  # bump when the way sequences are built changes


def data_dir(arg=None):
    """--data-dir, else $TINYDISTIL_DATA, else ~/.cache/tinydistil."""
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("TINYDISTIL_DATA"):
        return Path(os.environ["TINYDISTIL_DATA"]).expanduser()
    return Path.home() / ".cache" / "tinydistil"


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(folder):
    """The teacher's WordPiece tokenizer, from folder/tokenizer.json or else folder/vocab.txt.

    Padding and truncation are switched off (published tokenizer.json files pad everything to 128);
    callers turn them on per use, e.g. through encode_batch.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise UserError(f"no tokenizer.json or vocab.txt in {folder}: point to a BERT checkpoint folder")
    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            lowercase = True
            if (folder / "tokenizer_config.json").is_file():
                lowercase = json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True)
            tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase)._tokenizer
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
        raise UserError(f"cannot read the tokenizer in {folder} ({e}): delete it and download it again") from e
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_ids(tok):
    """{"pad", "unk", "cls", "sep", "mask"} -> id in this tokenizer's vocabulary."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token: use a BERT WordPiece tokenizer")
    return ids


def encode_batch(tok, texts, pairs=None, max_len=128):
    """Tokenize texts (or text pairs) with [CLS]/[SEP] and token types, padded to the longest in the
    batch and truncated longest_first to max_len. Returns int64 tensors input_ids, attention_mask,
    token_type_ids, each (B, T). Leaves the tokenizer padding/truncating this way."""
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.enable_padding(pad_id=special_ids(tok)["pad"], pad_token=SPECIAL_TOKENS["pad"])
    encs = tok.encode_batch(list(texts) if pairs is None else list(zip(texts, pairs)))
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.long),
    }


# ----------------------------------------------------------------------------- corpus text

def _atomic_write(path, write):
    """Call write(file) on a temp file next to path, then rename it into place (a name unique to
    this process, so DDP ranks preparing the same data never share a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def wikitext_file(name, split, root):
    """Path of a WikiText split under root, downloading and extracting the archive if needed."""
    archive, folder, pattern = WIKITEXT[name]
    path = root / folder / pattern.format(split=split)
    if path.is_file():
        return path
    zpath = fetch_url(WIKITEXT_URL + archive, root / archive, headers=BROWSER_HEADERS, desc=archive)
    try:
        with zipfile.ZipFile(zpath) as z:
            for s in ("train", "valid", "test"):
                member = f"{folder}/{pattern.format(split=s)}"
                _atomic_write(root / member, lambda f: f.write(z.read(member)))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        zpath.unlink(missing_ok=True)
        raise UserError(f"{zpath} is not a valid {archive} ({e}); it was removed, run again to download it")
    return path


def _read_lines(path):
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the corpus file {path} ({e}): give a readable UTF-8 text file")


def corpus_files(data, root, split="train"):
    """The text files behind --data: a WikiText split, a text file, or every .txt in a folder."""
    if data in WIKITEXT:
        return [wikitext_file(data, split, root)]
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"no .txt files in {path}: give a text file or a folder of .txt files")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"--data {data}: not {' or '.join(WIKITEXT)}, nor an existing text file or folder")


def corpus_texts(data, root, split="train"):
    """One text per non-blank line. WikiText lines are article paragraphs; its ` = Heading = ` lines
    are dropped (titles, not coherent text), its ` @-@ ` style joiners undone, and the `<unk>` of the
    tokenised version becomes the tokenizer's [UNK]. A user's own text is taken as it is."""
    texts = []
    for path in corpus_files(data, root, split):
        for line in _read_lines(path):
            line = line.strip()
            if not line:
                continue
            if data in WIKITEXT:
                if line.startswith("= ") and line.endswith(" ="):
                    continue
                line = f" {line} "
                for joiner, char in WIKITEXT_JOINERS.items():
                    line = line.replace(joiner, char)
                line = line.replace("<unk>", SPECIAL_TOKENS["unk"]).strip()
            texts.append(line)
    return texts


# ----------------------------------------------------------------------------- sequences

class Sequences:
    """Token id sequences stored flat: sequence i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, ids, offsets, stats=None):
        self.ids, self.offsets, self.stats = ids, offsets, stats or {}
        self.lengths = np.diff(offsets)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def build_sequences(token_lists, ids, seq_len):
    """`[CLS] text [SEP]` per text, then the reference LmSeqsDataset filters: texts longer than
    seq_len split into chunks of seq_len - 2 with [CLS]/[SEP] re-added, sequences of 11 tokens or
    fewer dropped, sequences with half or more [UNK] dropped. Returns (list of arrays, stats)."""
    cls, sep, unk = ids["cls"], ids["sep"], ids["unk"]
    chunks = []
    for toks in token_lists:
        seq = [cls, *toks, sep]
        if len(seq) <= seq_len:
            chunks.append(seq)
            continue
        for i in range(0, len(seq), seq_len - 2):
            sub = seq[i:i + seq_len - 2]
            chunks.append(([] if sub[0] == cls else [cls]) + sub + ([] if sub[-1] == sep else [sep]))
    long_enough = [c for c in chunks if len(c) >= MIN_LEN]
    kept = [c for c in long_enough if c.count(unk) / len(c) < 0.5]
    stats = {"texts": len(token_lists), "chunks": len(chunks), "dropped_short": len(chunks) - len(long_enough),
             "dropped_unk": len(long_enough) - len(kept), "sequences": len(kept),
             "tokens": sum(len(c) for c in kept)}
    return kept, stats


def load_corpus(data, tok, root, *, data_fraction=0.1, seq_len=128, split="train"):
    """Sequences of --data tokenised by the teacher's tokenizer, cached under root (the data dir).

    data_fraction keeps the first fraction of the texts. The cache file is keyed by the corpus
    files, the fraction, the tokenizer and seq_len, so a change to any of them re-tokenises.
    Switches the tokenizer's padding and truncation off, as load_tokenizer leaves it."""
    if not 0 < data_fraction <= 1:
        raise UserError(f"--data-fraction {data_fraction}: give a number in (0, 1]")
    if seq_len < MIN_LEN:
        raise UserError(f"--seq-len {seq_len}: sequences of fewer than {MIN_LEN} tokens are dropped, use more")
    root = Path(root)
    ids = special_ids(tok)
    files = corpus_files(data, root, split)
    tok.no_padding()
    tok.no_truncation()
    key = json.dumps([CACHE_VERSION, [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                      data_fraction, seq_len, hashlib.sha256(tok.to_str().encode()).hexdigest()])
    name = data if data in WIKITEXT else Path(data).name
    cache = root / "cache" / f"{name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return Sequences(z["ids"], z["offsets"], json.loads(str(z["stats"])))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt, not trusted
    texts = corpus_texts(data, root, split)
    texts = texts[:math.ceil(len(texts) * data_fraction)]
    token_lists = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    seqs, stats = build_sequences(token_lists, ids, seq_len)
    if not seqs:
        raise UserError(f"--data {data}: no sequence of {MIN_LEN}+ tokens left after filtering; "
                        "give more text or a larger --data-fraction")
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=stats["tokens"])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    _atomic_write(cache, lambda f: np.savez(f, ids=flat, offsets=offsets, stats=np.array(json.dumps(stats))))
    return Sequences(flat, offsets, stats)


def token_probs(seqs, vocab_size, special, smoothing=0.7):
    """Probability weight of each vocabulary id to be masked, as the reference's `mlm_smoothing`:
    max(count, 1) ** -smoothing from the corpus token counts, 0 for special tokens. (V,) float32."""
    if seqs.ids.size and int(seqs.ids.max()) >= vocab_size:
        raise UserError(f"the corpus has token id {int(seqs.ids.max())} but the model's vocabulary has "
                        f"{vocab_size}: the teacher and its tokenizer do not match")
    counts = np.bincount(seqs.ids, minlength=vocab_size)
    probs = np.maximum(counts, 1).astype(np.float64) ** -smoothing
    probs[list(special)] = 0.0
    return torch.from_numpy(probs).float()


# ----------------------------------------------------------------------------- batches

class Batches:
    """Batches of sequences of similar lengths, in a shuffled order fixed by (seed, epoch).

    As the reference GroupedBatchSampler: walk a random permutation, put each sequence in the
    bucket of its length (4-token buckets), emit a bucket when it holds batch_size sequences;
    the leftovers, in bucket order, make the last batches. For DDP every rank builds the same list
    and takes every world_size-th batch; the tail that would leave ranks uneven is dropped so all
    ranks step together. The data position for resuming is (epoch, batch index on this rank).
    """

    def __init__(self, lengths, batch_size, seed=0, rank=0, world_size=1):
        self.lengths, self.batch_size = np.asarray(lengths), batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.groups = (self.lengths + 1) // 4  # the reference's bins 3, 7, 11, ...
        if len(self) == 0:
            raise UserError(f"{len(self.lengths)} sequences make fewer batches of {batch_size} than the "
                            f"{world_size} processes: give more data or a smaller --batch-size")

    def __len__(self):
        n = math.ceil(len(self.lengths) / self.batch_size)
        return n // self.world_size

    def epoch_batches(self, epoch, start=0):
        """This rank's batches (lists of sequence indices) for an epoch, from batch `start` on."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        buckets, batches = {}, []
        for i in order.tolist():
            bucket = buckets.setdefault(int(self.groups[i]), [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                del buckets[int(self.groups[i])]
        rest = [i for g in sorted(buckets) for i in buckets[g]]
        batches += [rest[j:j + self.batch_size] for j in range(0, len(rest), self.batch_size)]
        mine = batches[self.rank:len(self) * self.world_size:self.world_size]
        return mine[start:]

    def stream(self, epoch=0, start=0):
        """Endless (epoch, batch index, indices), resuming at data position (epoch, start)."""
        while True:
            for i, idx in enumerate(self.epoch_batches(epoch, start), start):
                yield epoch, i, idx
            epoch, start = epoch + 1, 0


def collate(seqs, idx, pad_id):
    """Pad the sequences idx to the longest of them: (input_ids, attention_mask), int64 (B, T)."""
    rows = [seqs[i] for i in idx]
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.from_numpy(r.astype(np.int64))
        attention_mask[b, :len(r)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------- masking

def mask_batch(input_ids, attention_mask, token_probs, mask_id, vocab_size, generator,
               mlm_mask_prop=0.15, word_mask=0.8, word_keep=0.1, word_rand=0.1):
    """Dynamic MLM masking as the reference distiller.prepare_batch_mlm (new masks every call).

    ceil(mlm_mask_prop * real tokens in the batch) positions are drawn without replacement over the
    whole flattened batch, weighted by token_probs of their ids (0 for special tokens and padding);
    each is then replaced by [MASK] (word_mask), kept (word_keep) or a token drawn uniformly from
    the whole vocabulary (word_rand). generator lives on input_ids' device and makes it reproducible.
    Returns (masked input_ids, labels): labels hold the original id at predicted positions, else -100.
    """
    B, T = input_ids.shape
    weights = token_probs.to(input_ids.device)[input_ids.flatten()] * attention_mask.flatten()  # (B*T,)
    n_tgt = min(math.ceil(mlm_mask_prop * attention_mask.sum().item()), int((weights > 0).sum()))
    pred_mask = torch.zeros(B * T, dtype=torch.bool, device=input_ids.device)
    if n_tgt > 0:
        pred_mask[torch.multinomial(weights / weights.sum(), n_tgt, replacement=False, generator=generator)] = True
    pred_mask = pred_mask.view(B, T)

    real = input_ids[pred_mask]
    rand = torch.randint(vocab_size, real.shape, generator=generator, device=real.device)
    pred_probs = torch.tensor([word_mask, word_keep, word_rand], device=real.device)
    kind = torch.multinomial(pred_probs, len(real), replacement=True, generator=generator) if len(real) else real
    new = torch.where(kind == 0, torch.full_like(real, mask_id), torch.where(kind == 1, real, rand))
    masked = input_ids.masked_scatter(pred_mask, new)
    labels = input_ids.masked_fill(~pred_mask, -100)
    return masked, labels
