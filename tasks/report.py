"""report.py: the paper's Tables 1 and 2 in markdown, its published rows beside ours.

    python tinydistil.py report --results results.jsonl --teacher bert-base-uncased

The results file has one JSON object per line, {"task", "model", "teacher", "metrics", "runs",
"seconds", "config"}, appended by each `eval` run; for every (model, task, distilled or not) the
last line counts. A model fine-tuned with --teacher (the paper's second distillation step) gets
its own "(D)" row under the model's. Table 1 shows each GLUE task's score as the paper does
(glue.task_score) and the macro-score once all nine tasks have results; Table 2 shows IMDb test
accuracy and SQuAD v1.1 dev EM/F1. Numbers are percent; "-" marks a missing result. A result of
several seeds is their median with the min-max spread beside it; "†" marks a result trained on a
subset or for fewer epochs than the task's recipe, i.e. not the paper's protocol. Retention rows
give each other row's numbers as a percentage of the teacher's, as the paper's "97% of BERT" is
77.0 / 79.5. The teacher is the model named by --teacher, by default bert-base-uncased if present.
Lines of `eval stsb --zero-shot` ("zero_shot": true: nothing fine-tuned) get a table of their own,
a row per model and pooling, never mixed with the fine-tuned STS-B column.
Paper: Sanh et al. 2019 (arXiv 1910.01108v4), section 4 and 4.1, Tables 1 and 2.
"""

import functools
import json
from pathlib import Path

from common import UserError
from svg import bar_panel, page
from tasks import glue
from tasks.finetune import DEFAULTS

# Table 1 of arXiv 1910.01108v4 (dev sets; BERT-base and DistilBERT are medians of 5 runs): the
# Score, then the tasks in the paper's order, which is alphabetical, so GLUE_COLUMNS below.
PAPER_GLUE = {
    "ELMo": (68.7, 44.1, 68.6, 76.6, 71.1, 86.2, 53.4, 91.5, 70.4, 56.3),
    "BERT-base": (79.5, 56.3, 86.7, 88.6, 91.8, 89.6, 69.3, 92.7, 89.0, 53.5),
    "DistilBERT": (77.0, 51.3, 82.2, 87.5, 89.2, 88.5, 59.9, 91.3, 86.9, 56.3),
}
# Table 2 of the same: IMDb test accuracy, SQuAD v1.1 dev EM, F1. (D) adds distillation during
# fine-tuning.
PAPER_DOWNSTREAM = {
    "BERT-base": (93.46, 81.2, 88.5),
    "DistilBERT": (92.82, 77.7, 85.8),
    "DistilBERT (D)": (None, 79.1, 86.9),
}
GLUE_COLUMNS = sorted(glue.TASKS)  # the paper's column order; headings are the tasks' folder names
DEFAULT_TEACHER = "bert-base-uncased"
OFF_PROTOCOL = "†"  # not "*", which markdown may read as emphasis


def latest(results_path):
    """{row: {task: results line}}, later lines replacing earlier ones; row is the model, or
    "<model> (D)" for one fine-tuned with a teacher."""
    path = Path(results_path)
    if not path.is_file():
        raise UserError(f"no results file {path}: run `python tinydistil.py eval TASK` first")
    out = {}
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if line.get("zero_shot"):  # no fine-tuning: its own table (zero_shot_rows)
                continue
            row = str(line["model"]) + (" (D)" if line.get("teacher") else "")
            out.setdefault(row, {})[str(line["task"])] = {**line, "metrics": dict(line["metrics"])}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n} is not a results line ({e!r}): "
                            f"fix or delete that line") from e
    return out


def zero_shot_rows(results_path):
    """{(model, pooling): results line} of `eval stsb --zero-shot`, the latest of each."""
    out = {}
    for text in Path(results_path).read_text(encoding="utf-8").splitlines():
        line = json.loads(text) if text.strip() else {}
        if line.get("zero_shot"):
            out[(str(line["model"]), str(line.get("pooling")))] = line
    return out


def _zero_shot_table(results_path, teacher):
    """Zero-shot STS-B dev, apart from the fine-tuned rows: Spearman and Pearson x 100, and each
    row's Spearman as a percentage of the teacher's with the same pooling."""
    rows = zero_shot_rows(results_path)
    lines = ["| Model | Pooling | Spearman | Pearson | Spearman, % of teacher |",
             "|---|---|---:|---:|---:|"]
    for (model, pooling), line in rows.items():
        base = rows.get((teacher, pooling)) if model != teacher else None
        share = (f"{100 * line['metrics']['spearman'] / base['metrics']['spearman']:.1f}"
                 if base and base["metrics"]["spearman"] else "-")
        name = model.replace("|", "\\|")
        lines.append(f"| {name} | {pooling} | "
                     f"{100 * line['metrics']['spearman']:.2f} | "
                     f"{100 * line['metrics']['pearson']:.2f} | {share} |")
    return "\n".join(lines)


def _off_protocol(line):
    """True when the run trained on a subset or for fewer epochs than the task's recipe."""
    config = line.get("config") or {}
    if config.get("max_train_examples") is not None:
        return True
    recipe = DEFAULTS.get(line["task"])
    return recipe is not None and config.get("epochs", recipe.epochs) < recipe.epochs


def _cell(line, score):
    """(percent, note) of one result: score(metrics) of the line's median, then the min-max over
    its seeds and the off-protocol marker as a note."""
    note = ""
    runs = line.get("runs") or []
    if len(runs) > 1:
        scores = [score(run["metrics"]) * 100 for run in runs]
        note = f" ({min(scores):.1f}-{max(scores):.1f})"
    return score(line["metrics"]) * 100, note + (OFF_PROTOCOL if _off_protocol(line) else "")


def _glue_row(lines):
    cells = [_cell(lines[t], functools.partial(glue.task_score, t)) if t in lines else (None, "")
             for t in GLUE_COLUMNS]
    score = None
    if all(t in lines for t in glue.TASKS):
        score = glue.glue_score({t: lines[t]["metrics"] for t in glue.TASKS}) * 100
    marked = any(note.endswith(OFF_PROTOCOL) for _, note in cells)
    return [(score, OFF_PROTOCOL if marked else "")] + cells


def _metric(task, key):
    """The function that reads one metric of a task's results, checked."""
    def read(metrics):
        if key not in metrics:
            raise UserError(f"{task} results lack {key}: run the {task} evaluation again")
        return metrics[key]
    return read


def _downstream_row(lines):
    wanted = (("imdb", "accuracy"), ("squad", "exact_match"), ("squad", "f1"))
    return [_cell(lines[task], _metric(task, key)) if task in lines else (None, "")
            for task, key in wanted]


def _retention(row, base):
    """Each cell of row as a percentage of base's; no notes."""
    return [(100 * x / b if x is not None and b else None, "")
            for (x, _), (b, _) in zip(row, base)]


def _plain(values):
    return [(x, "") for x in values]


def _table(head, rows, digits):
    lines = ["| " + " | ".join(("Model",) + head) + " |", "|---" + "|---:" * len(head) + "|"]
    for name, cells in rows:
        places = [1] * len(cells) if "%" in name else digits  # retention rows: one decimal
        text = ["-" if x is None else f"{x:.{d}f}{note}" for (x, note), d in zip(cells, places)]
        lines.append("| " + " | ".join([name.replace("|", "\\|")] + text) + " |")
    return "\n".join(lines)


def _row_order(names):
    """Models in the order they first appear, each one's (D) row right under its plain row."""
    models = dict.fromkeys(name.removesuffix(" (D)") for name in names)
    return [name for model in models for name in (model, f"{model} (D)") if name in names]


def _measured_rows(results, teacher, row_fn):
    """A row per model with a result in this table (its (D) row right under it), then each one's
    retention relative to the teacher."""
    rows = {name: row_fn(lines) for name, lines in results.items()}
    rows = {name: row for name, row in rows.items() if any(x is not None for x, _ in row)}
    order = _row_order(list(rows))
    table = [(f"{name} (ours)", rows[name]) for name in order]
    if teacher in rows:
        table += [(f"{name} / {teacher}, % (ours)", _retention(rows[name], rows[teacher]))
                  for name in order if name != teacher]
    return table


def _paper_rows(paper):
    rows = [(f"{name} (paper)", _plain(row)) for name, row in paper.items()]
    ratio = _retention(_plain(paper["DistilBERT"]), _plain(paper["BERT-base"]))
    return rows + [("DistilBERT / BERT-base, % (paper)", ratio)]


def _notes(results):
    """The footnotes the results need: what a spread and what the marker mean."""
    lines = [line for tasks in results.values() for line in tasks.values()]
    notes = []
    if any(len(line.get("runs") or []) > 1 for line in lines):
        notes.append("A number followed by (a-b): the median of several seeds (`eval --seeds`) "
                     "and their min-max.")
    if any(_off_protocol(line) for line in lines):
        notes.append(f"{OFF_PROTOCOL} trained on a subset of the training set "
                     "(--max-train-examples) or for fewer epochs than the task's recipe: not the "
                     "paper's protocol, so not comparable with its rows.")
    return notes


def render(results_path, teacher=None):
    """Markdown with Table 1 (GLUE dev) and Table 2 (IMDb test, SQuAD dev)."""
    results = latest(results_path)
    zero_shot = zero_shot_rows(results_path)
    zero_shot_models = {model for model, _ in zero_shot}
    if teacher is None:
        teacher = DEFAULT_TEACHER if DEFAULT_TEACHER in results else None
    elif teacher not in results and teacher not in zero_shot_models:
        raise UserError(f"teacher {teacher!r} has no results in {results_path}: "
                        f"models there: {', '.join(results)}")
    headings = tuple(glue.TASKS[t].dir for t in GLUE_COLUMNS)
    table1 = _table(("Score",) + headings,
                    _paper_rows(PAPER_GLUE) + _measured_rows(results, teacher, _glue_row),
                    [1] * 10)
    table2 = _table(("IMDb (acc.)", "SQuAD EM", "SQuAD F1"),
                    _paper_rows(PAPER_DOWNSTREAM) + _measured_rows(results, teacher,
                                                                   _downstream_row), [2, 1, 1])
    retention = (f" Retention is relative to the teacher {teacher}." if teacher else
                 " No teacher in the results, so no retention rows (see --teacher).")
    return "\n\n".join([
        "## Table 1: GLUE dev sets", table1,
        "Per task, in percent: CoLA Matthews correlation, STS-B mean of Pearson and Spearman, "
        "MRPC and QQP mean of F1 and accuracy, MNLI mean of matched and mismatched accuracy, "
        "accuracy elsewhere. Score: their mean, once all nine tasks have results. Paper rows: "
        "Sanh et al. 2019, Table 1 (its BERT-base Score, 79.5, is not the mean of its row, 79.7; "
        "the others are).",
        "## Table 2: IMDb (test accuracy) and SQuAD v1.1 (dev EM/F1)", table2,
        "Paper rows: Sanh et al. 2019, Table 2. (D): a second distillation step during "
        "fine-tuning, from a teacher fine-tuned on the task (`eval --teacher`); the paper's is "
        "SQuAD's." + retention,
    ] + _notes(results) + ([
        "## Zero-shot STS-B dev (no fine-tuning)", _zero_shot_table(results_path, teacher),
        "`eval stsb --zero-shot`: the cosine of the two sentences' pooled last hidden states "
        "against the gold scores, over all dev pairs, in percent (tasks/zero_shot.py).",
    ] if zero_shot else [])) + "\n"


def render_svg(results_path, teacher=None):
    """Tables 1 and 2 as grouped bars (svg.py): the paper's rows in greys beside ours in colours,
    one bar per row and column of the markdown tables (retention rows left out: they are ratios)."""
    results = latest(results_path)
    if teacher is None:
        teacher = DEFAULT_TEACHER if DEFAULT_TEACHER in results else None
    headings = ["Score"] + [glue.TASKS[t].dir for t in GLUE_COLUMNS]
    panels = []
    for title, groups, paper, row_fn in (
            ("Table 1: GLUE dev, %", headings, PAPER_GLUE, _glue_row),
            ("Table 2: IMDb test accuracy, SQuAD v1.1 dev EM and F1, %",
             ["IMDb (acc.)", "SQuAD EM", "SQuAD F1"], PAPER_DOWNSTREAM, _downstream_row)):
        rows = _paper_rows(paper) + _measured_rows(results, teacher, row_fn)
        series = {name: [x for x, _ in cells] for name, cells in rows if "%" not in name}
        panels.append(bar_panel(title, groups, series,
                                paper=[f"{name} (paper)" for name in paper]))
    return page(panels, columns=1, title=f"{results_path}: Tables 1 and 2 beside the paper's")
