"""scripts/bench/probe_cpu_modes.py: where bench.py's CPU modes spend their time (paper section 4.2,
Table 3, and past it): the int8 modes packed for each quantized engine torch has (fbgemm, onednn,
x86), interleaved on the same pairs as bench.py (bench.time_passes), and one mode's operators by
self time (torch.profiler). Random DistilBERT weights: speed does not depend on them.

    python scripts/bench/probe_cpu_modes.py --data-dir DIR --limit 100   # the engines
    python scripts/bench/probe_cpu_modes.py --data-dir DIR --limit 50 --profile int8+cls+compiled

fast.CpuKind.int8_engine picks the engine from the CPU's flags; this is the measurement behind it.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import bench  # noqa: E402
import fast  # noqa: E402
from model import BERT, BertConfig  # noqa: E402


class Engine:
    """Stands in for bench.CPU while a model is prepared: its int8 weights packed for one engine."""

    def __init__(self, name):
        self.int8_engine = name


def time_engines(model, inputs, modes):
    """Seconds per pass of every int8 mode in modes with every engine, interleaved."""
    cpu, runs = torch.device("cpu"), {}
    for engine in torch.backends.quantized.supported_engines:
        if engine in ("qnnpack", "none"):  # ARM's engine; no x86 kernels worth timing
            continue
        with mock.patch.object(bench, "CPU", Engine(engine)):
            for mode in [m for m in modes if m.startswith("int8")]:
                runs[f"{mode} {engine}"] = (bench.prepare(model, mode, cpu), cpu, inputs)
    for key, seconds in bench.time_passes(runs, len(inputs)).items():
        print(f"  {key:32s} {1000 * seconds / len(inputs):7.2f} ms / example")


def profile_mode(model, inputs, mode: str, rows=15):
    """One mode's operators over the pairs, by self CPU time."""
    m = bench.prepare(model, mode, torch.device("cpu"))
    with torch.inference_mode():
        for x in inputs[:bench.WARMUP]:
            m(**x, return_logits=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in inputs:
                m(**x, return_logits=False)
    print(f"\n{mode}: {len(inputs)} passes, operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="", help="where glue/STS-B/dev.tsv is")
    p.add_argument("--limit", type=int, default=100, help="the first N pairs")
    p.add_argument("--modes", default="int8,int8+cls", help="int8 modes to time per engine")
    p.add_argument("--profile", default="", help="a bench.py mode to profile instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = bench.BenchConfig(limit=args.limit, data_dir=args.data_dir)
    pairs, what = bench.load_pairs(cfg)
    print(f"{len(pairs)} pairs of {what.split(',')[0]}; CPU: {fast.detect_cpu().describe()}")
    torch.manual_seed(0)
    model = BERT(replace(BertConfig.preset("distilbert-base-uncased"), mlm_head=False)).eval()
    inputs = bench.encode(bench.tokenizer_for(model, cfg)[0], pairs, model)
    if args.profile:
        profile_mode(model, inputs, args.profile)
    else:
        time_engines(model, inputs, args.modes.split(","))


if __name__ == "__main__":
    main()
