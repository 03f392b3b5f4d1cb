"""tasks: the downstream evaluations of the paper (section 4 and 4.1, Tables 1 and 2), without datasets/sklearn.

    glue.py     the nine GLUE tasks: task table, tsv loaders, download of the official zips
    imdb.py     IMDb sentiment (aclImdb v1), read straight from the tar.gz
    squad.py    SQuAD v1.1: loading, 384-token windows with stride 128, span postprocessing, EM/F1
    metrics.py  accuracy, F1, MCC, Pearson, Spearman, SQuAD EM/F1 and the GLUE macro-score
    finetune.py fine-tuning with the reference heads and one results line per run: python tinydistil.py eval TASK
    report.py   Tables 1 and 2 in markdown, ours beside the paper's: python tinydistil.py report
"""
