"""report.py: the paper's Tables 1 and 2 in markdown, its published rows beside ours from a results file.

    python tinydistil.py report --results results.jsonl --teacher bert-base-uncased

The results file has one JSON object per line, {"task", "model", "metrics", "seconds", "config"}, appended by
each `eval` run; for every (model, task) the last line counts. Table 1 shows each GLUE task's score as the
paper does (metrics.task_score) and the macro-score once all nine tasks have results; Table 2 shows IMDb test
accuracy and SQuAD v1.1 dev EM/F1. Numbers are percent; "-" marks a missing result. Retention rows give
each other model's numbers as a percentage of the teacher's, as the paper's "97% of BERT" is 77.0 / 79.5.
The teacher is the model named by --teacher, by default the one named bert-base-uncased when present.
Paper: Sanh et al. 2019 (arXiv 1910.01108v4), section 4 and 4.1, Tables 1 and 2.
"""

import json
from pathlib import Path

from common import UserError
from tasks.metrics import GLUE_TASKS, glue_score, task_score

# Table 1 of arXiv 1910.01108v4 (dev sets; BERT-base and DistilBERT are medians of 5 runs), columns as COLUMNS.
PAPER_GLUE = {
    "ELMo": (68.7, 44.1, 68.6, 76.6, 71.1, 86.2, 53.4, 91.5, 70.4, 56.3),
    "BERT-base": (79.5, 56.3, 86.7, 88.6, 91.8, 89.6, 69.3, 92.7, 89.0, 53.5),
    "DistilBERT": (77.0, 51.3, 82.2, 87.5, 89.2, 88.5, 59.9, 91.3, 86.9, 56.3),
}
# Table 2 of the same: IMDb test accuracy, SQuAD v1.1 dev EM, F1. (D) adds distillation during fine-tuning.
PAPER_DOWNSTREAM = {
    "BERT-base": (93.46, 81.2, 88.5),
    "DistilBERT": (92.82, 77.7, 85.8),
    "DistilBERT (D)": (None, 79.1, 86.9),
}
COLUMNS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")  # the paper's order
HEADINGS = ("CoLA", "MNLI", "MRPC", "QNLI", "QQP", "RTE", "SST-2", "STS-B", "WNLI")
DEFAULT_TEACHER = "bert-base-uncased"


def latest(results_path):
    """{model: {task: metrics}} from the results file, later lines replacing earlier ones."""
    path = Path(results_path)
    if not path.is_file():
        raise UserError(f"no results file {path}: run `python tinydistil.py eval TASK` first")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                r = json.loads(line)
                out.setdefault(str(r["model"]), {})[str(r["task"])] = dict(r["metrics"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n} is not a results line ({e!r}): fix or delete that line") from e
    return out


def _glue_row(m):
    score = glue_score(m) * 100 if all(t in m for t in GLUE_TASKS) else None
    return [score] + [task_score(t, m[t]) * 100 if t in m else None for t in COLUMNS]


def _downstream_row(m):
    def get(task, key):
        if task not in m:
            return None
        if key not in m[task]:
            raise UserError(f"{task} results lack {key}: run the {task} evaluation again")
        return m[task][key] * 100
    return [get("imdb", "accuracy"), get("squad", "exact_match"), get("squad", "f1")]


def _retention(row, base):
    return [100 * x / b if x is not None and b else None for x, b in zip(row, base)]


def _table(head, rows, digits):
    lines = ["| " + " | ".join(("Model",) + head) + " |", "|---" + "|---:" * len(head) + "|"]
    for name, cells in rows:
        places = [1] * len(cells) if "%" in name else digits  # retention rows: one decimal everywhere
        text = ["-" if x is None else f"{x:.{d}f}" for x, d in zip(cells, places)]
        lines.append("| " + " | ".join([name.replace("|", "\\|")] + text) + " |")
    return "\n".join(lines)


def _ours(results, teacher, row_fn):
    """A row per model with a result in this table, then each one's retention relative to the teacher."""
    ours = {model: row_fn(m) for model, m in results.items() if any(x is not None for x in row_fn(m))}
    rows = [(f"{model} (ours)", row) for model, row in ours.items()]
    if teacher in ours:
        rows += [(f"{model} / {teacher}, % (ours)", _retention(row, ours[teacher]))
                 for model, row in ours.items() if model != teacher]
    return rows


def render(results_path, teacher=None):
    """Markdown with Table 1 (GLUE dev) and Table 2 (IMDb test, SQuAD dev)."""
    results = latest(results_path)
    if teacher is None:
        teacher = DEFAULT_TEACHER if DEFAULT_TEACHER in results else None
    elif teacher not in results:
        raise UserError(f"teacher {teacher!r} has no results in {results_path}: models there: {', '.join(results)}")
    paper1 = [(f"{name} (paper)", list(row)) for name, row in PAPER_GLUE.items()]
    paper1.append(("DistilBERT / BERT-base, % (paper)", _retention(PAPER_GLUE["DistilBERT"], PAPER_GLUE["BERT-base"])))
    paper2 = [(f"{name} (paper)", list(row)) for name, row in PAPER_DOWNSTREAM.items()]
    paper2.append(("DistilBERT / BERT-base, % (paper)",
                   _retention(PAPER_DOWNSTREAM["DistilBERT"], PAPER_DOWNSTREAM["BERT-base"])))
    return "\n\n".join([
        "## Table 1: GLUE dev sets",
        _table(("Score",) + HEADINGS, paper1 + _ours(results, teacher, _glue_row), [1] * 10),
        "Per task, in percent: CoLA Matthews correlation, STS-B mean of Pearson and Spearman, MRPC and QQP mean "
        "of F1 and accuracy, MNLI mean of matched and mismatched accuracy, accuracy elsewhere. Score: their "
        "mean, once all nine tasks have results. Paper rows: Sanh et al. 2019, Table 1 (its BERT-base Score, "
        "79.5, is not the mean of its row, 79.7; the others are).",
        "## Table 2: IMDb (test accuracy) and SQuAD v1.1 (dev EM/F1)",
        _table(("IMDb (acc.)", "SQuAD EM", "SQuAD F1"), paper2 + _ours(results, teacher, _downstream_row), [2, 1, 1]),
        "Paper rows: Sanh et al. 2019, Table 2; (D) is DistilBERT with a second distillation step during "
        "fine-tuning on SQuAD." + (f" Retention is relative to the teacher {teacher}." if teacher else
                                   " No teacher in the results, so no retention rows (see --teacher)."),
    ]) + "\n"
