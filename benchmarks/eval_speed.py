"""Evaluation speed on the Fashion-MNIST test set: img/s of metrics.evaluate at several eval batch sizes.

The Fashion-MNIST i-ResNet default model (Russian-roulette log-det, 2 exact terms; the estimator draws its extra
terms per batch, so each batch size is timed with the same seed) on the real test images, 2 threads.
The old default eval_batch_size was 500, the new one 128: both are in the list. Weights: a run directory's
best weights (--run-dir), else the profile's freshly initialised model with converged spectral norms (the
speed does not depend on training).

    .venv/bin/python benchmarks/eval_speed.py --threads 2 [--n 10000] [--batches 500 128 64 256] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, loadavg, table  # noqa: E402

from mixflow_core import build_model  # noqa: E402
from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.eval.metrics import evaluate  # noqa: E402
from mixflow_core.flows.iresnet.lipschitz import converge_spectral_norms  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402
from mixflow_core.training.runs import load_run_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=10_000, help="test images evaluated per batch size (default: all 10k)")
    p.add_argument("--batches", type=int, nargs="+", default=[500, 128, 64, 256])
    p.add_argument("--run-dir", type=Path, help="evaluate this run's best weights (default: a fresh model)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_profile("fashion-mnist", "default", "iresnet")
    data = load_data(cfg.data)
    if args.run_dir is not None:
        model, cfg, _, _ = load_run_model(args.run_dir)
    else:
        torch.manual_seed(0)
        model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
        converge_spectral_norms(model)
    test = Subset(data.test, range(min(args.n, len(data.test))))
    print(header(args.threads))
    print(f"model: {'run ' + str(args.run_dir) if args.run_dir else 'fresh fashion-mnist i-ResNet default'}, "
          f"eval log-det {cfg.model.eval_logdet or cfg.model.logdet}, {len(test)} test images\n")
    rows = []
    for batch in args.batches:
        torch.manual_seed(0)
        load = loadavg()
        t0 = time.perf_counter()
        m = evaluate(model, test, batch)
        seconds = time.perf_counter() - t0
        rows.append({"eval batch": batch, "img/s": len(test) / seconds, "seconds": seconds,
                     "10k test images (min)": 10_000 / (len(test) / seconds) / 60, "accuracy": m["accuracy"],
                     "bits/dim": m["bpd_conditional"], "load before": load})
        print(table(rows[-1:]), flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
