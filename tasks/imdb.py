"""imdb.py: the IMDb movie-review sentiment task (Maas et al. 2011, aclImdb v1), read straight
from its tar.gz.

    from tasks import imdb
    train = imdb.load("train")  # [Example(text, None, label), ...], label 1 positive, 0 negative
    test = imdb.load("test")

The archive is <data_dir>/imdb/aclImdb_v1.tar.gz (data_dir: --data-dir, else $TINYDISTIL_DATA,
else ~/.cache/tinydistil), downloaded from URL when missing. Reviews are
aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt; they are streamed out of the archive, never
extracted (100k small files), and returned in a fixed order: negatives then positives, each by
numeric id. The unlabelled train/unsup reviews are skipped. As the paper, models are trained on
train (25k) and scored on test (25k) by accuracy. Paper: section 4.1, Table 2 (IMDb test accuracy).
"""

import re
import tarfile
import zlib

from tqdm import tqdm

import corpus
from common import UserError
from hub import fetch_url
from tasks.glue import Example

URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
LABELS = ("neg", "pos")  # label names in id order
_REVIEW = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt")


def archive(data_dir=None):
    """Path of the archive, downloaded first when it is missing."""
    name = "aclImdb_v1.tar.gz"
    return fetch_url(URL, corpus.data_dir(data_dir) / "imdb" / name, desc=name)


def load(split, data_dir=None):
    if split not in ("train", "test"):
        raise UserError(f"IMDb has no split {split!r}: use train or test")
    path = archive(data_dir)
    reviews = []
    try:
        with tarfile.open(path, "r|gz") as tar:  # stream mode: one pass, no member index
            for member in tqdm(tar, desc=f"imdb {split}", unit=" files", leave=False):
                m = _REVIEW.fullmatch(member.name)
                if m and m[1] == split and member.isfile():
                    text = tar.extractfile(member).read().decode("utf-8")
                    label = LABELS.index(m[2])
                    reviews.append((label, int(m[3]), Example(text, None, label)))
    except (tarfile.TarError, zlib.error, EOFError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): delete it and run again to download it") from e
    if not reviews:
        raise UserError(f"{path} holds no aclImdb/{split}/pos or neg reviews: "
                        "delete it and run again")
    reviews.sort(key=lambda r: r[:2])
    return [r[2] for r in reviews]
