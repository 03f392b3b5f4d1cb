"""corpus.py: the pretraining corpus on disk: WikiText or your own text, tokenised once into a
memory-mapped cache. The plumbing under data.py, which holds the method.

Paper section 3, "Data and compute power": DistilBERT is distilled on BERT's corpus, English
Wikipedia and the Toronto Book Corpus. Here WikiText-2/103 (downloaded) or a user's own dump
stands in; data.py cuts each text into sequences (build_sequences), which this module stores and
maps back.

Used by `python tinydistil.py pretrain` and `fit-head`; the tests are
`python -m pytest -q test_all.py -k TestData`.

    tok = data.load_tokenizer(teacher_folder)
    seqs = load_corpus("wikitext-2-raw", tok, data_dir(None), data_fraction=0.1, seq_len=128)
    seqs[0]  # the token ids of the first sequence: [CLS] ... [SEP], a numpy array

Corpora of any size. `--data` is a WikiText name (downloaded), a text file (one text per line), a
.jsonl file (one text per record, its "text" field: the usual export of a Wikipedia or book dump)
or a folder of .txt/.jsonl files. The first load streams the text through the tokenizer's batch
call, a chunk at a time, into a prepared folder under <data dir>/cache/:

    tokens.bin    the kept sequences back to back: uint16, or uint32 past 65,536 vocabulary ids
    offsets.bin   int64, sequence i is tokens[offsets[i]:offsets[i + 1]]
    meta.json     the cache key, dtype, token and sequence counts, the build statistics

The folder is built under a temporary name and renamed when complete, so a kill at any moment
leaves nothing that looks finished; a folder whose files lack the sizes meta.json records is
rebuilt. Later loads (and the other DDP ranks) only map the files read-only with np.memmap: memory
does not grow with the corpus, and N processes on one machine share one copy in the page cache.
"""
import functools
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import UserError, atomic_write, check_folder, folder_from_env
from data import MIN_LEN, SPECIAL_TOKENS, Sequences, build_sequences, special_ids
from hub import fetch_url

WIKITEXT_URL = "https://wikitext.smerity.com/"  # the original S3 bucket is gone; same archives
# the WikiText host refuses Python's default User-Agent
BROWSER_HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                                 "(KHTML, like Gecko) Chrome/120.0 Safari/537.36"}
# --data name -> (archive, folder inside the archive and under data_dir, file name pattern)
WIKITEXT = {
    "wikitext-2-raw": ("wikitext-2-raw-v1.zip", "wikitext-2-raw", "wiki.{split}.raw"),
    "wikitext-2": ("wikitext-2-v1.zip", "wikitext-2", "wiki.{split}.tokens"),
    "wikitext-103-raw": ("wikitext-103-raw-v1.zip", "wikitext-103-raw", "wiki.{split}.raw"),
    "wikitext-103": ("wikitext-103-v1.zip", "wikitext-103", "wiki.{split}.tokens"),
}
WIKITEXT_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
CACHE_VERSION = 2  # bump when the way sequences are built or stored changes
CHUNK_CHARS = 1 << 20  # text per tokenizer call: ~250K tokens keep its threads busy, bound memory
STATS = ("texts", "chunks", "dropped_short", "dropped_unk", "sequences", "tokens")


def data_dir(arg=None):
    """Where the data sets live (this corpus, and GLUE, IMDb, SQuAD under tasks/): --data-dir,
    else $TINYDISTIL_DATA, else ~/.cache/tinydistil."""
    if arg:
        return check_folder(arg, "--data-dir")
    return folder_from_env("TINYDISTIL_DATA") or Path.home() / ".cache" / "tinydistil"


# ----------------------------------------------------------------------------- corpus text

def wikitext_file(name, split, root):
    """Path of a WikiText split under root, downloading and extracting the archive if needed."""
    archive, folder, pattern = WIKITEXT[name]
    path = root / folder / pattern.format(split=split)
    if path.is_file():
        return path
    try:
        zpath = fetch_url(WIKITEXT_URL + archive, root / archive, headers=BROWSER_HEADERS,
                          desc=archive)
    except UserError as e:  # offline or unreachable: the other version may already be here
        raise UserError(f"{e}{_other_wikitext_hint(name, split, root)}") from None
    try:
        with zipfile.ZipFile(zpath) as z:
            for s in ("train", "valid", "test"):
                member = f"{folder}/{pattern.format(split=s)}"
                with z.open(member) as src:  # streamed: WikiText-103's train split is 540 MB
                    atomic_write(root / member, functools.partial(shutil.copyfileobj, src))
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        zpath.unlink(missing_ok=True)
        raise UserError(f"{zpath} is not a valid {archive} ({e}); it was removed, "
                        "run again to download it")
    except OSError as e:
        raise UserError(f"cannot extract {zpath} into {root / folder} ({e}): "
                        "free some disk space or choose another --data-dir") from None
    return path


def _other_wikitext_hint(name, split, root):
    """'; use --data X' when the other version of this WikiText (raw or tokenised) is on disk."""
    other = name.removesuffix("-raw") if name.endswith("-raw") else f"{name}-raw"
    _, folder, pattern = WIKITEXT[other]
    if not (root / folder / pattern.format(split=split)).is_file():
        return ""
    kind = "raw" if other.endswith("-raw") else "tokenised"
    return f"; {other} (the {kind} version) is already in {root}: use --data {other}"


def corpus_files(data, root, split="train"):
    """The files behind --data: a WikiText split, a text or .jsonl file, or every .txt and .jsonl
    file under a folder (recursive, sorted by path)."""
    if data in WIKITEXT:
        return [wikitext_file(data, split, Path(root))]
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise UserError(f"no .txt files (nor .jsonl) in {path}: "
                            "give a text file or a folder of them")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"--data {data}: not {' or '.join(WIKITEXT)}, "
                    "nor an existing text file or folder")


def _decoded_lines(path):
    """(line number, line) of a UTF-8 file, read in binary one line at a time, so memory stays one
    line and a bad byte is reported by line and byte offset."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read the corpus file {path} ({e}): "
                        "give a readable UTF-8 text file")
    with f:
        offset = 0
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"cannot read the corpus file {path}: not UTF-8 at line "
                                f"{number} (byte offset {offset + e.start}: {e.reason}): "
                                "convert it to UTF-8") from None
            offset += len(raw)


def _clean_wikitext(line):
    """A WikiText paragraph with its ` @-@ ` style joiners undone and the `<unk>` of the tokenised
    version as the tokenizer's [UNK]; None for a ` = Heading = ` line (a title, not coherent
    text)."""
    if line.startswith("= ") and line.endswith(" ="):
        return None
    line = f" {line} "
    for joiner, char in WIKITEXT_JOINERS.items():
        line = line.replace(joiner, char)
    return line.replace("<unk>", SPECIAL_TOKENS["unk"]).strip()


def _jsonl_texts(path):
    """The "text" field of each record of a .jsonl file, one text per record."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e.msg}): "
                            "give one per line") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f'{path}:{number}: no "text" string in this record: give every line '
                            'a "text" field')
        if text.strip():
            yield text.strip()


def _file_texts(path, wikitext):
    """The texts of one corpus file: one per non-blank line (WikiText cleaned) or .jsonl record."""
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path)
        return
    for _, raw in _decoded_lines(path):
        for line in raw.splitlines():  # the same line breaks as str.splitlines on the whole file
            line = line.strip()
            if line and wikitext:
                line = _clean_wikitext(line)
            if line:
                yield line


def iter_texts(data, root, split="train", files=None):
    """The corpus texts of --data, one at a time: WikiText paragraphs without headings, a user's
    lines (or .jsonl records) as they are, stripped."""
    files = files or corpus_files(data, root, split)
    for path in files:
        yield from _file_texts(path, data in WIKITEXT)


def corpus_texts(data, root, split="train"):
    """Every text of --data as a list (iter_texts streams them)."""
    return list(iter_texts(data, root, split))


# ----------------------------------------------------------------------------- the prepared cache

def token_dtype(vocab_size):
    """The smallest unsigned dtype holding every id of the vocabulary: uint16 for the BERT
    vocabularies (ids up to 65,535), else uint32. Never one that would wrap."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise UserError(f"a vocabulary of {vocab_size} ids does not fit 32-bit token ids")


def load_corpus(data, tok, root, *, data_fraction=0.1, seq_len=128, split="train"):
    """Sequences of --data tokenised by the teacher's tokenizer, prepared once under root/cache.

    data_fraction keeps the first fraction of the texts. The prepared folder is keyed by the corpus
    files (path, size, mtime), the WikiText cleaning, the fraction, seq_len, the tokenizer and the
    format version, so a change to any of them prepares again; a finished folder is only mapped
    (what the other DDP ranks do after rank 0 prepared it). Switches the tokenizer's padding and
    truncation off, as load_tokenizer leaves it."""
    if not 0 < data_fraction <= 1:
        raise UserError(f"--data-fraction {data_fraction}: give a number in (0, 1]")
    if seq_len < MIN_LEN:
        raise UserError(f"--seq-len {seq_len}: sequences of fewer than {MIN_LEN} tokens are "
                        "dropped, use more")
    root = Path(root)
    special_ids(tok)  # a tokenizer without BERT's special tokens is refused before any work
    files = corpus_files(data, root, split)
    tok.no_padding()
    tok.no_truncation()
    stat = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = json.dumps([CACHE_VERSION, stat, data in WIKITEXT, data_fraction, seq_len,
                      hashlib.sha256(tok.to_str().encode()).hexdigest()])
    name = data if data in WIKITEXT else Path(data).name
    folder = root / "cache" / f"{name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    seqs = open_prepared(folder, key)
    if seqs is None:
        prepare_corpus(data, tok, files, folder, key, data_fraction=data_fraction, seq_len=seq_len)
        seqs = open_prepared(folder, key)
    if seqs is None:
        raise UserError(f"the corpus prepared in {folder} cannot be read back: check the disk")
    return seqs


def open_prepared(folder, key):
    """The Sequences of a finished prepared folder, mapped read-only; None when there is none, it
    was made with other settings, or a file does not have the size meta.json records."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        expected = {"tokens.bin": meta["tokens"] * dtype.itemsize,
                    "offsets.bin": (meta["sequences"] + 1) * 8}
        sizes = {name: (folder / name).stat().st_size for name in expected}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{folder}: unreadable ({e}), preparing it again", file=sys.stderr)
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        return None
    if sizes != expected or meta["tokens"] == 0:
        print(f"{folder}: file sizes {sizes} are not the recorded {expected}, preparing it again",
              file=sys.stderr)
        return None
    ids = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r")
    offsets = np.memmap(folder / "offsets.bin", dtype=np.int64, mode="r")
    if offsets[0] != 0 or offsets[-1] != len(ids):
        return None
    return Sequences(ids, offsets, meta["stats"])


# ----------------------------------------------------------------------------- preparation

def prepare_corpus(data, tok, files, folder, key, *, data_fraction, seq_len):
    """Tokenise --data into the prepared folder, streaming: one pass counts (and so checks) every
    text before anything is written, the second tokenises a chunk at a time. The files are written
    into folder.<pid>.<random>.tmp and the whole folder renamed into place when complete."""
    name = data if data in WIKITEXT else Path(data).name
    texts = functools.partial(iter_texts, data, None, files=files)
    n_texts = sum(1 for _ in tqdm(texts(), desc=f"reading {name}", unit=" texts", mininterval=1))
    if n_texts == 0:
        where = f"--data {data} ({len(files)} files)"
        if len(files) == 1:
            where = f"the corpus file {files[0]}"
        raise UserError(f"{where} holds no text (empty or blank): give UTF-8 text")
    n_keep = math.ceil(n_texts * data_fraction)
    _sweep(folder)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir(parents=True)
        kept = itertools.islice(texts(), n_keep)
        stats = _write_sequences(tok, kept, n_keep, tmp, seq_len, name)
        if stats["sequences"] == 0:
            raise UserError(f"--data {data}: no sequence of {MIN_LEN}+ tokens left after "
                            "filtering; give more text or a larger --data-fraction")
        dtype = token_dtype(tok.get_vocab_size())
        meta = {"version": CACHE_VERSION, "key": key, "dtype": dtype.name,
                "tokens": stats["tokens"], "sequences": stats["sequences"], "stats": stats}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    except OSError as e:  # a full disk or a read-only data dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the prepared corpus in {folder.parent} ({e}): it needs "
                        "about 2 bytes per token; free space or choose another --data-dir"
                        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_sequences(tok, texts, n_texts, tmp, seq_len, name):
    """Stream texts through the tokenizer into tmp/tokens.bin and tmp/offsets.bin; the stats."""
    special, dtype = special_ids(tok), token_dtype(tok.get_vocab_size())
    stats = dict.fromkeys(STATS, 0)
    t0 = time.perf_counter()
    bar = tqdm(total=n_texts, desc=f"preparing {name}", unit=" texts", mininterval=1)
    with open(tmp / "tokens.bin", "wb") as tokens_file, \
            open(tmp / "offsets.bin", "wb") as offsets_file, bar:
        offsets_file.write(np.zeros(1, np.int64))
        for chunk in _chunks(texts, CHUNK_CHARS):
            flat, lengths, chunk_stats = _encode_chunk(tok, chunk, special, seq_len, dtype)
            tokens_file.write(flat)
            offsets_file.write(stats["tokens"] + np.cumsum(lengths))  # (n,) int64 sequence ends
            for k in STATS:
                stats[k] += chunk_stats[k]
            bar.update(len(chunk))
            rate = stats["tokens"] / (time.perf_counter() - t0)
            bar.set_postfix_str(f"{stats['tokens'] / 1e6:.1f}M tokens, {rate / 1e3:.0f}K tokens/s",
                                refresh=False)
    return stats


def _chunks(texts, max_chars):
    """Lists of consecutive texts, each about max_chars characters in all."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tok, texts, special, seq_len, dtype):
    """One chunk of texts through the tokenizer's (multi-threaded) batch call and build_sequences:
    (flat token array of dtype, int64 sequence lengths, stats)."""
    token_lists = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    seqs, stats = build_sequences(token_lists, special, seq_len)
    flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=stats["tokens"])
    if flat.size and flat.max() > np.iinfo(dtype).max:  # token_dtype rules it out; never wrap
        raise UserError(f"token id {flat.max()} does not fit {dtype.name}: the tokenizer and its "
                        "vocabulary size disagree")
    lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
    return flat.astype(dtype), lengths, stats


def _publish(tmp, folder):
    """Rename the finished tmp folder to folder: a reader sees all of it or nothing. A damaged
    folder of the same key is moved aside first; one another process just published is kept."""
    if folder.exists():
        trash = folder.with_name(f"{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
        os.rename(folder, trash)  # mapped files stay valid for a process still reading them
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process published the same key in between: same content, keep it
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(folder):
    """Remove what killed preparations of this folder left: .tmp folders of processes that are
    gone (the name holds the pid), and .old folders a rebuild was deleting."""
    if not folder.parent.is_dir():
        return
    for path in folder.parent.iterdir():
        parts = path.name[len(folder.name) + 1:].split(".")
        if not path.name.startswith(f"{folder.name}.") or len(parts) != 3 \
                or parts[2] not in ("tmp", "old") or not parts[0].isdigit():
            continue
        if parts[2] == "tmp" and _alive(int(parts[0])):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True
