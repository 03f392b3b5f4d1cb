"""studies/corpus_scale.py: does data.py's corpus preparation scale? (issue 10). Results in
studies/corpus_scale.md.

    flock /tmp/tinydistil-cpu.lock python studies/corpus_scale.py --wikitext DIR \
        --teacher BERT_FOLDER --squad DIR/dev-v1.1.json --work /tmp/corpus_scale

Builds two corpora from WikiText-2 (all three splits, cleaned as `--data wikitext-2` cleans them,
one paragraph per line): "small", that text once (about 2.5M tokens), and "large", `--copies`
copies of its lines shuffled together (about 20M tokens). For each it measures:
  - preparation speed: data.load_corpus into an empty data dir, against the bare tokenizer's own
    encode_batch over the same texts (in data.py's chunks; and in one call for the small corpus);
  - `tinydistil.py pretrain --max-steps 1` (the loop of paper section 3, one step) with an empty
    data dir (it prepares) and again (it finds the cache): peak RSS, seconds to the line that
    reports the data and to the first step; and the cached data side alone, in-process
    (load_corpus, mask_weights, Batches);
  - two gloo ranks (torchrun) on the large corpus, cached: how much of tokens.bin each rank holds
    resident (Rss) and is charged for (Pss, shared pages split between the processes that map
    them), and each rank's anonymous (private) memory, sampled at the same moment;
  - with --squad, tokens per word and bytes per word of Wikipedia paragraphs (SQuAD's contexts),
    the ratios used to extrapolate to WikiText-103 and the paper's 3.3B words.
Prints the figures and writes them as JSON to --out.
"""
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import corpus  # noqa: E402  (the repository's corpus.py and data.py, from any working directory)
import data  # noqa: E402
from common import build_parser  # noqa: E402


@dataclass
class CorpusScaleConfig:
    wikitext: str = ""                   # folder with WikiText-2's wiki.{train,valid,test}.tokens
    teacher: str = ""                    # a BERT checkpoint folder (here the MiniLM-L6 encoder)
    squad: str = ""                      # SQuAD dev-v1.1.json, for Wikipedia's tokens per word
    work: str = "/tmp/corpus_scale"      # corpora, data dirs and runs (deleted and rebuilt)
    copies: int = 8                      # the large corpus is this many shuffled copies
    repeats: int = 3                     # timings: the best of this many (the machine is shared)
    out: str = ""                        # the figures as JSON; default WORK/results.json


# ----------------------------------------------------------------------------- corpora

def make_corpora(cfg, work):
    """small.txt: WikiText-2 train + valid + test paragraphs; large.txt: cfg.copies copies of
    them, shuffled (seed 0) so no stretch of the file repeats a neighbouring one."""
    root = work / "wikitext-root"
    (root / "wikitext-2").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        os.symlink(Path(cfg.wikitext).resolve() / f"wiki.{split}.tokens",
                   root / "wikitext-2" / f"wiki.{split}.tokens")
    splits = ("train", "valid", "test")
    lines = [t for s in splits for t in corpus.corpus_texts("wikitext-2", root, s)]
    small, large = work / "small.txt", work / "large.txt"
    small.write_text("\n".join(lines) + "\n")
    order = np.random.default_rng(0).permutation(len(lines) * cfg.copies) % len(lines)
    with open(large, "w") as f:
        for i in order:
            f.write(lines[i] + "\n")
    return {"small": small, "large": large}


def wikipedia_ratios(tok, squad_json):
    """Tokens per whitespace word and UTF-8 bytes per word of SQuAD dev's Wikipedia paragraphs."""
    articles = json.loads(Path(squad_json).read_text())["data"]
    paragraphs = [p["context"] for a in articles for p in a["paragraphs"]]
    words = sum(len(p.split()) for p in paragraphs)
    tokens = sum(len(e.ids) for e in tok.encode_batch(paragraphs, add_special_tokens=False))
    n_bytes = sum(len(p.encode()) + 1 for p in paragraphs)
    return {"paragraphs": len(paragraphs), "words": words, "tokens": tokens,
            "tokens_per_word": tokens / words, "bytes_per_word": n_bytes / words,
            "tokens_per_paragraph": tokens / len(paragraphs)}


# ----------------------------------------------------------------------------- preparation speed

def bare_tokenizer_seconds(tok, path, whole):
    """Seconds and tokens of the tokenizer's encode_batch alone over the texts of path, in
    data.py's chunks (or in one call), the text read beforehand."""
    texts = list(corpus.iter_texts(str(path), None))
    batches = [texts] if whole else list(corpus._chunks(texts, corpus.CHUNK_CHARS))
    t0, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - t0, tokens


def preparation_seconds(tok, path, root):
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    seqs = corpus.load_corpus(str(path), tok, root, data_fraction=1.0, seq_len=128)
    return time.perf_counter() - t0, seqs.stats


def measure_preparation(cfg, tok, corpora, work):
    rows = {}
    for name, path in corpora.items():
        times = {}
        for _ in range(cfg.repeats):  # alternated, so both see the same load on the machine
            for kind in ("bare", "prep") + (("bare_whole",) if name == "small" else ()):
                if kind == "prep":
                    seconds, stats = preparation_seconds(tok, path, work / f"prep-{name}")
                else:
                    seconds, tokens = bare_tokenizer_seconds(tok, path, kind == "bare_whole")
                times.setdefault(kind, []).append(seconds)
        rows[name] = {"texts": stats["texts"], "tokenizer_tokens": tokens,
                      "kept_tokens": stats["tokens"], "sequences": stats["sequences"],
                      "text_bytes": path.stat().st_size, "times_s": times,
                      "prep_vs_bare": min(times["bare"]) / min(times["prep"])}
        print(name, rows[name], flush=True)
    return rows


def batches_bytes(lengths):
    """Bytes per sequence that Batches allocates for one epoch: held (the epoch's batch lists,
    which stream() keeps for the epoch) and at the peak while building them (tracemalloc)."""
    tracemalloc.start()
    batches = data.Batches(lengths, 16).epoch_batches(0)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del batches
    return {"held_per_sequence": held / len(lengths), "peak_per_sequence": peak / len(lengths)}


def measure_data_side(tok, corpora, work, vocab_size):
    """Seconds of a cached load as pretrain does it: load_corpus (maps), mask_weights, Batches."""
    rows = {}
    for name, path in corpora.items():
        t0 = time.perf_counter()
        seqs = corpus.load_corpus(str(path), tok, work / f"prep-{name}", data_fraction=1.0)
        t1 = time.perf_counter()
        data.mask_weights(seqs, vocab_size, data.special_ids(tok).values())
        t2 = time.perf_counter()
        data.Batches(seqs.lengths, 16).epoch_batches(0)
        t3 = time.perf_counter()
        rows[name] = {"map_s": t1 - t0, "token_probs_s": t2 - t1, "batches_s": t3 - t2,
                      "batches_bytes": batches_bytes(seqs.lengths),
                      "files_bytes": {f.name: f.stat().st_size
                                      for f in next((work / f"prep-{name}" / "cache").iterdir())
                                      .iterdir()}}
        print(name, "cached data side", rows[name], flush=True)
    return rows


# ----------------------------------------------------------------------------- processes

def smaps(pid, mapped_name):
    """{field: kB} of /proc/pid/smaps_rollup, plus file_Rss/file_Pss of mapped_name's mappings."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":")
            out[key] = int(value.split()[0])
        in_file = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                in_file = line.endswith(mapped_name)
            elif in_file and line.startswith(("Rss:", "Pss:")):
                key = "file_" + line.split(":")[0]
                out[key] = out.get(key, 0) + int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def descendants(pid):
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(re.search(r"PPid:\s+(\d+)", status.read_text())[1])
        except (OSError, TypeError):
            continue
        if ppid == pid:
            kids += [int(status.parent.name), *descendants(int(status.parent.name))]
    return kids


SMAPS_FIELDS = ("Rss", "Pss", "Anonymous", "file_Rss", "file_Pss")


def run_measured(cmd, env):
    """Run cmd; return its exit code, its output lines with seconds since start, the peak RSS of
    the process tree in MB (getrusage of the children), and the smaps samples (every 0.1 s) that
    caught every process of the tree that maps tokens.bin, each {pid: {field: kB}}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    lines, samples, mappers = [], [], set()

    def read():
        for line in proc.stdout:  # text mode: tqdm's \r ends a line too
            lines.append((time.perf_counter() - t0, line.rstrip()))

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None:
        sample = {pid: smaps(pid, "tokens.bin") for pid in descendants(proc.pid) + [proc.pid]}
        sample = {pid: {f: s.get(f) for f in SMAPS_FIELDS}
                  for pid, s in sample.items() if s.get("file_Rss")}
        mappers |= set(sample)
        if sample and set(sample) == mappers:
            samples.append(sample)
        time.sleep(0.1)
    reader.join()
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return proc.returncode, lines, peak_mb, samples


def first_time(lines, pattern):
    return next((t for t, line in lines if re.search(pattern, line)), None)


def pretrain_cmd(cfg, corpus, data_dir, out, ddp=False):
    launcher = [sys.executable]
    if ddp:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return launcher + [str(REPO / "tinydistil.py"), "pretrain", "--teacher", cfg.teacher,
                       "--alpha-ce", "0", "--n-layer", "3", "--max-steps", "1", "--data",
                       str(corpus), "--data-fraction", "1.0", "--data-dir", str(data_dir),
                       "--out", str(out)]


def one_run(cfg, corpus, data_dir, out, ddp=False):
    """A fresh Python process per run, so getrusage's peak is this run's alone."""
    shutil.rmtree(out, ignore_errors=True)
    script = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import corpus_scale as s; "
              "print(json.dumps(s.run_measured(json.loads(sys.argv[2]), "
              "dict(os.environ, PYTHONUNBUFFERED='1'))))")
    cmd = pretrain_cmd(cfg, corpus, data_dir, out, ddp)
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                             json.dumps(cmd)], capture_output=True, text=True, check=True)
    code, lines, peak_mb, samples = json.loads(result.stdout.splitlines()[-1])
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(l for _, l in lines[-20:]))
    return {"peak_rss_mb": peak_mb, "data_line_s": first_time(lines, r"^data "),
            "first_step_s": first_time(lines, r"step\s+1/"), "wall_s": lines[-1][0],
            "smaps_kb": median_sample(samples)}


def median_sample(samples):
    """Per process, the median of each field over the samples in which every process holds all
    of tokens.bin (a process tearing down its mappings at exit would skew a single sample)."""
    n_processes = max((len(s) for s in samples), default=0)
    full_rss = max((v["file_Rss"] for s in samples for v in s.values()), default=0)
    whole = [s for s in samples
             if len(s) == n_processes and all(v["file_Rss"] == full_rss for v in s.values())]
    pids = whole[-1].keys() if whole else []
    return {pid: {f: float(np.median([s[pid][f] for s in whole])) for f in SMAPS_FIELDS}
            | {"samples": len(whole)} for pid in pids}


def measure_pretrain(cfg, corpora, work):
    rows = {}
    for name, corpus_path in corpora.items():
        for turn in ("prepares", "cached"):
            runs = []
            for _ in range(cfg.repeats):
                data_dir = work / f"run-data-{name}"
                if turn == "prepares":
                    shutil.rmtree(data_dir, ignore_errors=True)
                runs.append(one_run(cfg, corpus_path, data_dir, work / "out"))
            rows[f"{name}, {turn}"] = row = {"runs": runs, **{
                k: min(r[k] for r in runs) for k in ("data_line_s", "first_step_s", "wall_s")}}
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            print(name, turn, {k: v for k, v in row.items() if k != "runs"}, flush=True)
    runs = [one_run(cfg, corpora["large"], work / "run-data-large", work / "out", ddp=True)
            for _ in range(cfg.repeats)]
    rows["large, cached, 2 gloo ranks"] = {"runs": runs}
    print("2 gloo ranks", json.dumps(runs, indent=1), flush=True)
    return rows


def main(argv=None):
    parser = build_parser(CorpusScaleConfig, "Does data.py's corpus preparation scale? (issue 10)")
    cfg = CorpusScaleConfig(**vars(parser.parse_args(argv)))
    if not (Path(cfg.wikitext) / "wiki.train.tokens").is_file() or not Path(cfg.teacher).is_dir():
        parser.error("give --wikitext (a folder with wiki.train.tokens) and --teacher (a folder)")
    work = Path(cfg.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = data.load_tokenizer(cfg.teacher)
    results = {"config": dataclasses.asdict(cfg), "cpus": os.cpu_count()}
    if cfg.squad:
        results["wikipedia"] = wikipedia_ratios(tok, cfg.squad)
        print("wikipedia paragraphs", results["wikipedia"], flush=True)
    corpora = make_corpora(cfg, work)
    results["preparation"] = measure_preparation(cfg, tok, corpora, work)
    results["cached_data_side"] = measure_data_side(tok, corpora, work, tok.get_vocab_size())
    results["pretrain"] = measure_pretrain(cfg, corpora, work)
    out = Path(cfg.out or work / "results.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
