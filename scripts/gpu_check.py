"""scripts/gpu_check.py: every CUDA path of tinydistil once, in at most 8 minutes on one GPU.

    python scripts/make_gpu_bundle.py --data-dir DIR   # here, once: gpu_bundle/ (48 MiB)
    bash scripts/gpu_check.sh OUT                      # there: a GPU machine that reaches nothing
    DEVICE=cpu bash scripts/gpu_check.sh OUT           # anywhere: the same steps, tiny, on the CPU

Writes OUT/summary.json, one entry per path ({"name", "status": ok|failed|skipped, "figures",
"seconds", "note"}), and OUT/gpu_check.log, every command's output in one section each (a GPU slot
brings back few files). Exits 1 if a path failed. The paths, in order:

  tests          TestCuda and TestReadyForGPU (test_all.py's tests for a GPU) on the device
  syncs          host-device syncs per step (scripts/count_syncs.py; on CUDA also CUDA's count)
  pretrain       the MiniLM teacher (bfloat16 copy from the bundle) on WikiText-2, bfloat16, 300
                 steps; the same run stopped by SIGTERM half-way and --resume'd: how far the
                 resumed student is from the uninterrupted one (on the CPU: must be 0), and on CUDA
                 a rerun: how far two uninterrupted ones are apart
  torchrun       pretrain under torchrun, 1 process (nccl), and 2 if there are 2 GPUs
  eval           eval sst2 of the pretrained student, on 2,000 training sentences (3 epochs, lr
                 1e-4), the dev set; below 0.7 it fails (the CPU scores 0.776 with this recipe)
  bench          bench.py's rows on the device (batch 1), BERT-base and DistilBERT shapes
  pretrain-step  bench.py --pretrain-step at 16 x 128 and 5 x 512, student in bfloat16 (and at
                 5 x 512 in float32, i.e. TF32), teacher bfloat16: tokens/s, MFU (also against
                 the bfloat16 peak), peak GPU memory
  reference      the same step built on transformers (scripts/bench_reference_pretrain_step.py),
                 where transformers is installed (the GPU image has it; it is too big to carry)
  suite          all of test_all.py on the device, in what is left of the budget (not on the CPU:
                 .ci/run has run it); a timeout keeps how far it got in the log

On the CPU (DEVICE=cpu) the same commands run at tiny sizes on the committed fixtures (the MiniLM
and the data sets are not needed), so CI runs this script and it cannot rot.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "fixtures"

SIZES = {  # what each path runs at, on a GPU and at tiny size on the CPU
    "cuda": dict(budget=480, steps=300, batch=16, seq=128, n_layer=3, log_every=10, save_every=100,
                 ddp_steps=20, eval_floor=0.7,
                 eval=["--max-train-examples", "2000", "--epochs", "3", "--lr", "1e-4"],
                 bench=["--limit", "200"],
                 step_sizes=[(16, 128, "bfloat16"), (5, 512, "bfloat16"), (5, 512, "float32")],
                 step_steps=10, reference=(16, 128, 5), timeout=240),
    "cpu": dict(budget=170, steps=20, batch=8, seq=32, n_layer=2, log_every=5, save_every=10,
                ddp_steps=4, eval_floor=0.0,
                eval=["--max-train-examples", "32", "--batch-size", "4", "--epochs", "1"],
                bench=["--limit", "3", "--dtypes", "float32,bfloat16"],
                step_sizes=[(2, 16, "bfloat16")], step_steps=1, reference=(2, 16, 1),
                timeout=120),
}


class Check:
    """Runs the commands of every path, logs them, and keeps the summary."""

    def __init__(self, out: Path, device: str, bundle: Path):
        self.out, self.device, self.bundle = out, device, bundle
        self.size, self.start, self.entries = SIZES[device], time.time(), []
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check."))
        self.log = open(out / "gpu_check.log", "w")
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINYDISTIL_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1"}

    def command(self, args, timeout=None, check=True) -> subprocess.CompletedProcess:
        """Run one command in the repository, its output into the log; raise if it failed."""
        self.log.write(f"\n$ {' '.join(map(str, args))}\n")
        self.log.flush()
        timeout = timeout or self.size["timeout"]
        try:
            r = subprocess.run([str(a) for a in args], cwd=ROOT, env=self.env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:  # keep what it printed: how far it got is the clue
            self.log.write(f"{as_text(e.stdout)}{as_text(e.stderr)}[killed after {timeout} s]\n")
            raise
        self.log.write(r.stdout + r.stderr + f"[exit {r.returncode}]\n")
        self.log.flush()
        if check and r.returncode != 0:
            raise RuntimeError(f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
        return r

    def path(self, name: str, run):
        """One path: its figures, status and time into the summary (written after each)."""
        t0, entry = time.time(), {"name": name, "status": "ok", "figures": {}, "note": ""}
        self.log.write(f"\n{'=' * 30} {name}\n")
        if time.time() - self.start > self.size["budget"]:
            entry.update(status="skipped", note="out of time (the check's budget is spent)")
        else:
            try:
                entry["figures"] = run(self) or {}
            except Skipped as e:
                entry.update(status="skipped", note=str(e))
            except Exception as e:  # a path failing must not stop the others
                entry.update(status="failed", note=f"{type(e).__name__}: {e}"[:500])
        entry["seconds"] = round(time.time() - t0, 1)
        self.entries.append(entry)
        summary = {"device": self.describe(), "seconds": round(time.time() - self.start, 1),
                   "paths": self.entries}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name:14s} {entry['status']:8s} {entry['seconds']:6.1f} s  "
              f"{json.dumps(entry['figures'])[:150]} {entry['note'][:200]}", flush=True)

    def describe(self) -> dict:
        import torch
        info = {"device": self.device, "torch": torch.__version__}
        if self.device == "cuda":
            info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                        capability=list(torch.cuda.get_device_capability()))
        return info

    # ------------------------------------------------------------------- inputs

    def teacher(self) -> str:
        if self.device == "cuda":
            return str(self.bundle / "minilm")
        return str(FIXTURES / "models" / "tiny-bert")

    def data_args(self) -> list:
        """--data and --data-dir: WikiText-2 from the bundle, or a corpus of the tiny vocabulary."""
        data = self.work / "data"
        if not data.exists() and self.device == "cuda":
            wiki = data / "wikitext-2"
            wiki.mkdir(parents=True)
            with gzip.open(self.bundle / "data/wikitext-2/wiki.train.tokens.gz", "rb") as f:
                (wiki / "wiki.train.tokens").write_bytes(f.read())
            shutil.copytree(self.bundle / "data/glue", data / "glue")
        elif not data.exists():
            words = [w for w in (FIXTURES / "models/tokenizer/vocab.txt").read_text().split()
                     if w.isalpha() and len(w) > 2]
            rng = random.Random(0)
            data.mkdir()
            (data / "corpus.txt").write_text("\n".join(
                " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
                for _ in range(300)) + "\n")
            shutil.copytree(FIXTURES / "tasks/glue", data / "glue")
        if self.device == "cuda":
            return ["--data", "wikitext-2", "--data-dir", data]
        return ["--data", data / "corpus.txt", "--data-dir", data, "--data-fraction", "1.0"]

    def pretrain_args(self, out: Path, steps: int) -> list:
        s = self.size
        alpha_ce = ["--alpha-ce", "0"] if self.device == "cuda" else []  # MiniLM: no MLM head
        return ["pretrain", "--teacher", self.teacher(), *self.data_args(), "--out", out,
                "--n-layer", s["n_layer"], "--batch-size", s["batch"], "--seq-len", s["seq"],
                "--max-steps", steps, "--log-every", s["log_every"],
                "--save-every", s["save_every"], "--dtype", "bfloat16",
                "--teacher-dtype", "bfloat16", "--device", self.device, "--seed", "1", *alpha_ce]


def as_text(output) -> str:
    """A TimeoutExpired's captured output: bytes or None, whatever run's text=True asked."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


class Skipped(Exception):
    """A path that cannot run here (said in its note)."""


def last_log_line(out: Path) -> dict:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    return {k: rec[k] for k in ("step", "loss", "tokens_per_s", "ms_per_step", "mfu")}


def max_difference(a: Path, b: Path) -> float:
    from hub import load_safetensors
    x, y = load_safetensors(a / "model.safetensors"), load_safetensors(b / "model.safetensors")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


# ----------------------------------------------------------------------------- the paths

def run_pytest(c: Check, selection: list, timeout: float) -> dict:
    args = [sys.executable, "-m", "pytest", "-q", "test_all.py", "-p", "no:cacheprovider", "-rs",
            "--durations=10", *selection]
    r = c.command(args, timeout=timeout, check=False)
    tail = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0:
        raise RuntimeError(tail)
    return {"result": tail}


def tests(c: Check) -> dict:
    """The tests written for a GPU, first: they are what only this machine can run."""
    quick = ["-m", "not slow"] if c.device == "cpu" else []  # on a GPU: nccl DDP's test too
    return run_pytest(c, ["-k", "TestReadyForGPU or TestCuda", *quick],
                      timeout=c.size["budget"] * 0.3)


def suite(c: Check) -> dict:
    """The whole test file on the device, last, in what is left of the budget: CI runs it on the
    CPU, so here it only adds what a CUDA machine changes (device "auto" picks the GPU). On the
    H200 it took over 288 s, more than the check can spare before its own paths."""
    if c.device == "cpu":
        raise Skipped(".ci/run has run the whole file already")
    left = c.size["budget"] - (time.time() - c.start)
    return run_pytest(c, [], timeout=max(left, 30))


def syncs(c: Check) -> dict:
    c.command([sys.executable, "scripts/count_syncs.py", "--device", c.device,
               "--json", c.work / "syncs.json"])
    result = json.loads((c.work / "syncs.json").read_text())
    return {k: result[k] for k in ("steps", "cuda_steps") if k in result}


def pretrain(c: Check) -> dict:
    s, runs = c.size, {name: c.work / name for name in ("full", "stopped", "rerun")}
    c.command([sys.executable, "tinydistil.py", *c.pretrain_args(runs["full"], s["steps"])])
    figures = last_log_line(runs["full"])
    # The same run, stopped by SIGTERM half-way (as a cluster preempts), then resumed.
    args = [sys.executable, "tinydistil.py", *map(str, c.pretrain_args(runs["stopped"],
                                                                       s["steps"]))]
    c.log.write(f"\n$ {' '.join(args)}  (SIGTERM half-way)\n")
    proc = subprocess.Popen(args, cwd=ROOT, env=c.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = runs["stopped"] / "train_log.jsonl"
    half = s["steps"] // s["log_every"] // 2
    while proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= half):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=s["timeout"])
    c.log.write(stdout + stderr + f"[exit {proc.returncode}]\n")
    if proc.returncode != 128 + signal.SIGTERM or "stopped by SIGTERM" not in stderr:
        raise RuntimeError(f"SIGTERM: exit {proc.returncode}, expected 143 and the resume line")
    stopped_at = (runs["stopped"] / "checkpoints" / "latest").read_text().strip()
    c.command([sys.executable, "tinydistil.py",
               *c.pretrain_args(runs["stopped"], s["steps"]), "--resume"])
    figures.update(stopped_at=stopped_at,
                   max_diff_resumed_vs_uninterrupted=max_difference(runs["full"], runs["stopped"]))
    if c.device == "cuda":  # how far CUDA's nondeterministic kernels alone take two runs apart
        c.command([sys.executable, "tinydistil.py", *c.pretrain_args(runs["rerun"], s["steps"])])
        figures["max_diff_two_uninterrupted"] = max_difference(runs["full"], runs["rerun"])
    if c.device == "cpu" and figures["max_diff_resumed_vs_uninterrupted"] > 1e-6:
        raise RuntimeError(f"resumed run differs by {figures['max_diff_resumed_vs_uninterrupted']}")
    return figures


def torchrun(c: Check) -> dict:
    import torch
    counts = [1] + ([2] if c.device == "cuda" and torch.cuda.device_count() >= 2 else [])
    figures = {}
    for n in counts:
        out = c.work / f"ddp{n}"
        args = c.pretrain_args(out, c.size["ddp_steps"])
        c.command([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={n}", "tinydistil.py", *args])
        figures[f"processes_{n}"] = last_log_line(out)
    return figures


def evaluate(c: Check) -> dict:
    student = c.work / "full"
    if not (student / "model.safetensors").is_file():
        raise Skipped("no student: the pretrain path failed")
    results = c.work / "results.jsonl"
    c.command([sys.executable, "tinydistil.py", "eval", "sst2", "--model", student,
               "--data-dir", c.work / "data", "--device", c.device, "--results", results,
               *c.size["eval"]])
    line = json.loads(results.read_text().splitlines()[-1])
    figures = {"accuracy": line["metrics"]["accuracy"], "seconds": line["seconds"]}
    # The floor makes a broken fine-tune visible: on the CPU this student and recipe score 0.776
    # (1 epoch at the task's lr 2e-5 scored 0.514 on the CPU and 0.525 on the H200: chance).
    if figures["accuracy"] < c.size["eval_floor"]:
        raise RuntimeError(f"accuracy {figures['accuracy']:.3f} < {c.size['eval_floor']}")
    return figures


def bench_rows(c: Check) -> dict:
    rows_path = c.work / "bench.json"
    models = [] if c.device == "cuda" else [
        "--models", f"{FIXTURES / 'models/tiny-bert'},{FIXTURES / 'models/tiny-distilbert'}"]
    r = c.command([sys.executable, "bench.py", "--device", c.device, *models, *c.size["bench"],
                   "--json", rows_path])
    rows = json.loads(rows_path.read_text())
    figures = {f"{Path(row['model']).name} {row['dtype']}": row["ms_per_example"] for row in rows}
    figures["launch_bound_note"] = "launch-bound" in r.stdout
    return figures


def pretrain_step(c: Check) -> dict:
    figures = {}
    for batch, seq, dtype in c.size["step_sizes"]:
        code = ("import json, bench; r = bench.time_distillation_steps(bench.BenchConfig("
                f"pretrain_step=True, batch_size={batch}, seq_len={seq}, "
                f"steps={c.size['step_steps']}, dtypes='{dtype}', device='{c.device}')); "
                "print('RESULT ' + json.dumps(r))")
        r = c.command([sys.executable, "-c", code])
        result = json.loads(r.stdout.split("RESULT ", 1)[1])
        figures[f"{batch}x{seq} {dtype}"] = {k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in result.items()}
    return figures


def reference(c: Check) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Skipped("transformers is not installed here (its wheels and their needs do not fit "
                      "beside the 48 MiB bundle in the 64 MiB a GPU slot carries)") from None
    batch, seq, steps = c.size["reference"]
    dtype = "bfloat16" if c.device == "cuda" else "float32"  # its CPU autocast crawls at 2 x 16
    r = c.command([sys.executable, "scripts/bench_reference_pretrain_step.py", "--device",
                   c.device, "--dtype", dtype, "--batch-size", batch, "--seq-len", seq,
                   "--steps", steps])
    return {"line": r.stdout.strip().splitlines()[-1]}


PATHS = [("tests", tests), ("syncs", syncs), ("pretrain", pretrain), ("torchrun", torchrun),
         ("eval", evaluate), ("bench", bench_rows), ("pretrain-step", pretrain_step),
         ("reference", reference), ("suite", suite)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--bundle", default=str(ROOT / "gpu_bundle"))
    ap.add_argument("--only", default="", help="comma-separated paths (a rerun); default: all")
    args = ap.parse_args()
    out, bundle = Path(args.out), Path(args.bundle)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device here: run DEVICE=cpu bash scripts/gpu_check.sh OUT")
        if not (bundle / "minilm" / "model.safetensors").is_file():
            sys.exit(f"error: no bundle at {bundle}: make it with python "
                     f"scripts/make_gpu_bundle.py --data-dir DIR, and carry it along")
    c = Check(out, args.device, bundle)
    try:
        for name, run in PATHS:
            if not args.only or name in args.only.split(","):
                c.path(name, run)
    finally:
        c.log.close()
        shutil.rmtree(c.work, ignore_errors=True)
    status = [e["status"] for e in c.entries]
    failed = [e["name"] for e in c.entries if e["status"] == "failed"]
    print(f"{len(c.entries)} paths in {time.time() - c.start:.0f} s"
          + (f", failed: {', '.join(failed)}" if failed else "") + f"; {out / 'summary.json'}")
    print(f"gpu_check: {status.count('ok')} passed, {len(failed)} failed, "
          f"{status.count('skipped')} skipped")  # a closing line CI reads, as pytest's
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
