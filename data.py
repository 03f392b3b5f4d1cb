"""data.py: what the student and teacher see at each step, paper section 3 "Distillation":
dynamic masking, batches grouped by length, one coherent text per sequence and no next-sentence
prediction.

The paper follows the best practices of Liu et al. 2019 (RoBERTa): the masks are drawn afresh
for every batch (mask_batch, below), and each sequence is one text rather than a pair of
segments, so there is no next-sentence objective. The reference code adds batches of sequences
of similar length, so that little of them is padding (Batches). This follows that code
(transformers examples/research_projects/distillation): distiller.py `prepare_batch_mlm` the
masking, token_counts.py and train.py the `mlm_smoothing` weights (mask_weights),
grouped_batch_sampler.py the batches, lm_seqs_dataset.py and scripts/binarized_data.py the
sequences (build_sequences). The corpus on disk (WikiText, text and .jsonl files, the
memory-mapped token cache) is corpus.py's.

Used by `python tinydistil.py pretrain` and `fit-head`; the tests are
`python -m pytest -q test_all.py -k TestData`.

    tok = load_tokenizer(teacher_folder)
    seqs = corpus.load_corpus("wikitext-2-raw", tok, corpus.data_dir(None), data_fraction=0.1)
    weights = mask_weights(seqs, vocab_size, special_ids(tok).values())
    batches = Batches(seqs.lengths, batch_size=16, seed=0, rank=0, world_size=1)
    for epoch, i, idx in batches.stream():
        input_ids, attention_mask = collate(seqs, idx, pad_id)
        input_ids, labels = mask_batch(input_ids, attention_mask, weights, mask_id, V, generator)
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import BertWordPieceTokenizer, Tokenizer

from common import UserError

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MIN_LEN = 12  # the reference drops sequences of 11 tokens or fewer
COUNT_CHUNK = 1 << 20  # tokens per np.bincount call in mask_weights (it makes an int64 copy)


# ----------------------------------------------------------------------------- masking

def mask_batch(input_ids, attention_mask, weights, mask_id, vocab_size, generator,
               mlm_mask_prop=0.15, word_mask=0.8, word_keep=0.1, word_rand=0.1):
    """Dynamic MLM masking as the reference distiller.prepare_batch_mlm (new masks every call).

    ceil(mlm_mask_prop * non-padding tokens in the batch) positions are drawn without replacement
    over the whole flattened batch, weighted by the mask_weights of their ids (0 for special tokens
    and padding); each is then replaced by [MASK] (word_mask), kept (word_keep) or a token drawn
    uniformly from the whole vocabulary (word_rand). generator lives on input_ids' device and makes
    it reproducible. Returns (masked input_ids, labels): labels hold the original id at predicted
    positions, else -100.
    """
    B, T = input_ids.shape
    # which positions are predicted: drawn over the whole batch, not per sequence, as the
    # reference; rare tokens more often than their share of the text (mask_weights)
    position_weights = weights.to(input_ids.device)[input_ids.flatten()]  # (B*T,)
    position_weights = position_weights * attention_mask.flatten()
    n_tgt = min(math.ceil(mlm_mask_prop * attention_mask.sum().item()),
                int((position_weights > 0).sum()))
    pred_mask = torch.zeros(B * T, dtype=torch.bool, device=input_ids.device)
    if n_tgt > 0:
        picked = torch.multinomial(position_weights / position_weights.sum(), n_tgt,
                                   replacement=False, generator=generator)
        pred_mask[picked] = True
    pred_mask = pred_mask.view(B, T)

    # what the student sees there: mostly [MASK], sometimes the token itself or a random one, so
    # that what it learns holds for text without [MASK] too, as at fine-tuning (BERT's 80/10/10)
    original = input_ids[pred_mask]  # (N,) the ids the student is asked to predict
    rand = torch.randint(vocab_size, original.shape, generator=generator, device=original.device)
    pred_probs = torch.tensor([word_mask, word_keep, word_rand], device=original.device)
    kind = original  # 0 mask, 1 keep, 2 random; drawn only when there is something to draw for
    if len(original):
        kind = torch.multinomial(pred_probs, len(original), replacement=True, generator=generator)
    new = torch.where(kind == 0, torch.full_like(original, mask_id),
                      torch.where(kind == 1, original, rand))
    masked = input_ids.masked_scatter(pred_mask, new)
    labels = input_ids.masked_fill(~pred_mask, -100)
    return masked, labels


def mask_weights(seqs, vocab_size, special, smoothing=0.7):
    """The weight of each vocabulary id to be picked for masking, as the reference's
    `mlm_smoothing`: max(count, 1) ** -smoothing from the corpus token counts, 0 for special
    tokens. (V,) float32, not normalised: mask_batch normalises over the positions of a batch.
    smoothing 0 is BERT's uniform choice; the reference's 0.7 picks rare tokens more often than
    their share of the text. The counts are taken a chunk at a time, so a mapped corpus is never
    copied whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(seqs.ids), COUNT_CHUNK):
        chunk_counts = np.bincount(seqs.ids[start:start + COUNT_CHUNK], minlength=vocab_size)
        if len(chunk_counts) > vocab_size:
            raise UserError(f"the corpus has token id {len(chunk_counts) - 1} but the model's "
                            f"vocabulary has {vocab_size}: the teacher and its tokenizer do not "
                            "match")
        counts += chunk_counts
    weights = np.maximum(counts, 1).astype(np.float64) ** -smoothing
    weights[list(special)] = 0.0
    return torch.from_numpy(weights).float()


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
            raise UserError(f"{len(self.lengths)} sequences make fewer batches of {batch_size} "
                            f"than the {world_size} processes: give more data or a smaller "
                            "--batch-size")

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


# ----------------------------------------------------------------------------- sequences

class Sequences:
    """Token id sequences stored flat: sequence i is ids[offsets[i]:offsets[i+1]]. ids and offsets
    are arrays, or read-only np.memmap views of a prepared corpus folder."""

    def __init__(self, ids, offsets, stats=None):
        self.ids, self.offsets, self.stats = ids, offsets, stats or {}
        self.lengths = np.diff(offsets)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def build_sequences(token_lists, special, seq_len):
    """`[CLS] text [SEP]` per text, then the reference LmSeqsDataset filters: texts longer than
    seq_len split into chunks of seq_len - 2 with [CLS]/[SEP] re-added, sequences of 11 tokens or
    fewer dropped, sequences with half or more [UNK] dropped. Returns (list of arrays, stats)."""
    cls, sep, unk = special["cls"], special["sep"], special["unk"]
    chunks = []
    for toks in token_lists:
        seq = [cls, *toks, sep]
        if len(seq) <= seq_len:
            chunks.append(seq)
            continue
        for i in range(0, len(seq), seq_len - 2):
            sub = seq[i:i + seq_len - 2]
            head = [] if sub[0] == cls else [cls]
            tail = [] if sub[-1] == sep else [sep]
            chunks.append(head + sub + tail)
    long_enough = [c for c in chunks if len(c) >= MIN_LEN]
    kept = [c for c in long_enough if c.count(unk) / len(c) < 0.5]
    stats = {"texts": len(token_lists), "chunks": len(chunks),
             "dropped_short": len(chunks) - len(long_enough),
             "dropped_unk": len(long_enough) - len(kept), "sequences": len(kept),
             "tokens": sum(len(c) for c in kept)}
    return kept, stats


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(folder):
    """The teacher's WordPiece tokenizer, from folder/tokenizer.json or else folder/vocab.txt.

    Padding and truncation are switched off (published tokenizer.json files pad everything to 128);
    callers turn them on per use, e.g. through encode_batch.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise UserError(f"no tokenizer.json or vocab.txt in {folder}: "
                        "point to a BERT checkpoint folder")
    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            lowercase = True
            if (folder / "tokenizer_config.json").is_file():
                config = json.loads((folder / "tokenizer_config.json").read_text())
                lowercase = config.get("do_lower_case", True)
            tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase)._tokenizer
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
        raise UserError(f"cannot read the tokenizer in {folder} ({e}): "
                        "delete it and download it again") from e
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_ids(tok):
    """{"pad", "unk", "cls", "sep", "mask"} -> id in this tokenizer's vocabulary."""
    special = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in special.items() if i is None]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)} token: "
                        "use a BERT WordPiece tokenizer")
    return special


def encode_batch(tok, texts, pairs=None, max_len=128):
    """Tokenize texts (or text pairs) with [CLS]/[SEP] and token types, padded to the longest in
    the batch and truncated longest_first to max_len. Returns int64 tensors input_ids,
    attention_mask, token_type_ids, each (B, T). Leaves the tokenizer padding and truncating so."""
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.enable_padding(pad_id=special_ids(tok)["pad"], pad_token=SPECIAL_TOKENS["pad"])
    encs = tok.encode_batch(list(texts) if pairs is None else list(zip(texts, pairs)))
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.long),
    }
