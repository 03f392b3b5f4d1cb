"""tasks: the downstream evaluations of the paper (section 4 and 4.1, Tables 1 and 2), without
datasets or sklearn.

    glue.py     the nine GLUE tasks: the task table, tsv loaders, the official zips, the GLUE score
    imdb.py     IMDb sentiment (aclImdb v1), read straight from the tar.gz
    squad.py    SQuAD v1.1: loading, 384-token windows with stride 128, max-context span decoding
    metrics.py  accuracy, F1, MCC, Pearson, Spearman, SQuAD EM/F1
    heads.py    TaskModel: an encoder with the reference task heads, saved in their layout
    finetune.py fine-tuning, --seeds medians, one results line per task: tinydistil.py eval TASK
    zero_shot.py  zero-shot STS-B (no training) and sentence-transformers pooling: eval --zero-shot
    distil.py   the teacher of distillation during fine-tuning, the paper's "(D)": eval --teacher
    report.py   Tables 1 and 2 in markdown, ours beside the paper's: tinydistil.py report
"""
