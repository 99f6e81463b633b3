"""The report's headline numbers over training seeds: mean ± sd of the flows (both backbones) and the baselines.

Trains the report's fixed configurations (`mixflow report`'s own configs and run directories in runs/report/, so the
report's seed-0 runs are reused and a finished seed is never retrained; an interrupted one resumes) for each seed,
scores the baselines as notebook 04 does, and writes the committed table that the README's headline rows and the
report's rerun check read: benchmarks/spread/<dataset>-<profile>.{json,md}.

    .venv/bin/python benchmarks/report_seeds.py --dataset digits [--seeds 0 1 2]
    .venv/bin/python benchmarks/report_seeds.py --dataset fashion-mnist [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, loadavg  # noqa: E402

from mixflow_core.study.report import project_root  # noqa: E402
from mixflow_core.study.spread import markdown_spread, seed_table, summarise  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--profile", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", help="flow configurations (default: fixed and fixed-<other backbone>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="default: benchmarks/spread/<dataset>-<profile>.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(project_root())  # the report's runs/report/ and data paths are relative to the project root
    out = args.out or Path("benchmarks/spread") / f"{args.dataset}-{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    head = header(args.threads)
    print(head + "\n", flush=True)
    load0, t0 = loadavg(), time.time()
    rows = seed_table(args.dataset, args.profile, args.seeds, args.configs, log=lambda line: print(line, flush=True))
    summary = summarise(rows)
    doc = {"dataset": args.dataset, "profile": args.profile, "seeds": args.seeds, "header": head,
           "load_start": load0, "load_end": loadavg(), "wall_s": time.time() - t0,
           "finished": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows, "summary": summary}
    out.write_text(json.dumps(doc, indent=1))
    md = markdown_spread(summary)
    out.with_suffix(".md").write_text(f"{head}\n\n{md}\n")
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
