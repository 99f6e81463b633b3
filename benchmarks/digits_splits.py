"""Digits on several splits: the mixture flow against the per-class Gaussian, image by image.

One digits test set holds 360 images, so the flow and the logit-space Gaussian baseline differ by
1-2 images on it (benchmarks/RESULTS.md): too few to say which classifies better. This script
repeats the comparison on several random train/val/test splits of the 1,797 images and pairs the
two models image by image.

For each split seed s:
- data.seed = s (a different stratified split) and train.seed = s; the digits profile (plus any
  --set overrides; runtime.max_minutes = None, so the epoch budget decides) is trained into
  RUN_ROOT/split<s> by runs.ensure_run: a finished run is reused, an interrupted one resumed, so
  nothing is lost when the script is stopped;
- the flow's test table log p(x|k) comes from its best checkpoint with `--draws` dequantisation
  draws, seeded exactly like its metrics.json (checked);
- the Gaussian baseline is fitted on the same split (baselines.gaussian_test_table, noise seed s,
  the same number of draws).
Pooled over splits, paired: b = images the flow classifies right and the Gaussian wrong, c = the
converse; the exact McNemar test is the two-sided binomial test of b out of b + c at 1/2. Bits/dim:
the per-image difference (flow - Gaussian), its mean and a 95% t-interval.

    .venv/bin/python benchmarks/digits_splits.py --splits 0 1 2 3 4 [--jobs 2] [--set prior.learn_scales=true]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, table  # noqa: E402

from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.eval.baselines import gaussian_test_table  # noqa: E402
from mixflow_core.eval.metrics import bits_per_dim, log_likelihood_table  # noqa: E402
from mixflow_core.training.config import apply_overrides  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402
from mixflow_core.training.runs import ensure_run, load_run_model, parse_set, read_json, seeded_rng  # noqa: E402


def split_config(split: int, profile: str, overrides: dict):
    base = apply_overrides(get_profile("digits", profile), overrides)
    # an epoch budget, not the profile's wall-clock one: results must not depend on the machine's load
    fixed = {"data.seed": split, "train.seed": split, "runtime.threads": 1, "runtime.progress": False,
             "runtime.max_minutes": None}
    return apply_overrides(base, fixed)


def train_split(split: int, profile: str, overrides: dict, run_root: str) -> tuple[int, float, bool]:
    """Train (or reuse / resume) one split's run; (split, wall seconds, trained now). Runs in a worker."""
    torch.set_num_threads(1)
    t0 = time.time()
    _, _, trained = ensure_run(split_config(split, profile, overrides), Path(run_root) / f"split{split}", profile)
    return split, time.time() - t0, trained


def per_image(table_: torch.Tensor, y: torch.Tensor, log_py: torch.Tensor, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct (N,) bool, conditional bits/dim per image (N,))."""
    table_ = table_.double()
    correct = ((table_ + log_py.double()).argmax(1) == y).numpy()
    bpd = (-table_.gather(1, y[:, None]).squeeze(1) / (dim * math.log(2.0))).numpy()
    return correct, bpd


def compare_split(split: int, run_root: str, draws: int) -> dict:
    run_dir = Path(run_root) / f"split{split}"
    model, cfg, _, _ = load_run_model(run_dir, "cpu")
    data = load_data(cfg.data)
    metrics = read_json(run_dir / "metrics.json")
    with seeded_rng(cfg.train.seed, torch.device("cpu")):  # as runs.train_run scored test
        flow_table, y = log_likelihood_table(model, data.test, cfg.runtime.eval_batch_size, "cpu", draws)
    log_py = model.prior.log_class_probs.detach().double()
    flow_ok, flow_bpd = per_image(flow_table, y, log_py, model.dim)
    if draws == metrics["test"]["draws"]:  # the same seeded draws as metrics.json: the same numbers
        assert abs(flow_ok.mean() - metrics["test"]["accuracy"]) < 1e-12, (flow_ok.mean(), metrics["test"])
    g_table, g_y, g_log_py, info = gaussian_test_table(data, seed=split, draws=draws)
    assert torch.equal(g_y, y)
    g_ok, g_bpd = per_image(g_table, g_y, g_log_py, info["dim"])
    assert abs(bits_per_dim(flow_table.double(), y, log_py, model.dim) - flow_bpd.mean()) < 1e-9
    return {
        "split": split, "n": len(y), "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"],
        "flow_val_acc": metrics["val"]["accuracy"], "flow_val_bpd": metrics["val"]["bpd_conditional"],
        "flow_acc": float(flow_ok.mean()), "gauss_acc": float(g_ok.mean()),
        "flow_bpd": float(flow_bpd.mean()), "gauss_bpd": float(g_bpd.mean()), "ridge": info["ridge"],
        "flow_only": int((flow_ok & ~g_ok).sum()), "gauss_only": int((~flow_ok & g_ok).sum()),
        "_flow_ok": flow_ok, "_g_ok": g_ok, "_dbpd": flow_bpd - g_bpd,
    }


def pooled(rows: list[dict]) -> dict:
    from scipy.stats import binomtest, t

    flow_ok = np.concatenate([r["_flow_ok"] for r in rows])
    g_ok = np.concatenate([r["_g_ok"] for r in rows])
    dbpd = np.concatenate([r["_dbpd"] for r in rows])
    b, c = int((flow_ok & ~g_ok).sum()), int((~flow_ok & g_ok).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    half = t.ppf(0.975, len(dbpd) - 1) * dbpd.std(ddof=1) / math.sqrt(len(dbpd))
    return {
        "n": int(len(flow_ok)), "flow_acc": float(flow_ok.mean()), "gauss_acc": float(g_ok.mean()),
        "flow_only": b, "gauss_only": c, "mcnemar_p": float(p),
        "dbpd_mean": float(dbpd.mean()), "dbpd_ci95": [float(dbpd.mean() - half), float(dbpd.mean() + half)],
        "flow_bpd": float(np.mean([r["flow_bpd"] for r in rows])), "gauss_bpd": float(np.mean([r["gauss_bpd"] for r in rows])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="profile overrides")
    ap.add_argument("--draws", type=int, default=16, help="dequantisation draws per test image (both models)")
    ap.add_argument("--jobs", type=int, default=2, help="splits trained at once (one torch thread each)")
    ap.add_argument("--run-root", default="runs/digits-splits")
    ap.add_argument("--json", help="write the rows and the pooled comparison here")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    split_config(args.splits[0], args.profile, overrides)  # fail on a bad override before any work
    print(header(1), flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train_split, s, args.profile, overrides, args.run_root) for s in args.splits]
        for f in futures:
            split, wall, trained = f.result()
            print(f"split {split}: {'trained' if trained else 'reused'} in {wall:.0f} s", flush=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [compare_split(s, args.run_root, args.draws) for s in args.splits]
    total = pooled(rows)
    cols = ["split", "n", "best_epoch", "epochs", "flow_val_acc", "flow_val_bpd", "flow_acc", "gauss_acc", "flow_only", "gauss_only", "flow_bpd",
            "gauss_bpd", "ridge"]
    print(table([{k: r[k] for k in cols} for r in rows], cols))
    val = {k: float(np.mean([r[k] for r in rows])) for k in ("flow_val_acc", "flow_val_bpd")}
    total["flow_validation_means"] = val
    print(f"\nflow on validation (mean over splits, the basis for choosing between flow configurations): "
          f"{100 * val['flow_val_acc']:.2f}% / {val['flow_val_bpd']:.4f} bits/dim")
    print(f"pooled over {len(rows)} splits ({total['n']} test images, {args.draws} draws): "
          f"flow {100 * total['flow_acc']:.2f}% vs Gaussian {100 * total['gauss_acc']:.2f}%; "
          f"flow right / Gaussian wrong {total['flow_only']}, the converse {total['gauss_only']}, "
          f"exact McNemar p = {total['mcnemar_p']:.3g}")
    lo, hi = total["dbpd_ci95"]
    print(f"bits/dim: flow {total['flow_bpd']:.4f} vs Gaussian {total['gauss_bpd']:.4f}; "
          f"per-image difference {total['dbpd_mean']:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f})")
    print(f"wall time {time.time() - t0:.0f} s")
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": clean, "pooled": total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
