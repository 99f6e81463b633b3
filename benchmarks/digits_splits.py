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

With --reference-set, a second flow configuration (the profile with those overrides; no overrides: the
profile as it is) is trained on the same splits into --reference-run-root and paired with the first
the same way (flow - reference), with each configuration's training time per split (the sum of its
epochs' seconds in history.json, so a reused run reports the time it took when it was trained).

    .venv/bin/python benchmarks/digits_splits.py --splits 0 1 2 3 4 [--jobs 2] [--set prior.learn_scales=true]
    .venv/bin/python benchmarks/digits_splits.py --set model.power_rtol=null --reference-set   # vs the profile
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


def flow_split(split: int, run_dir: Path, draws: int) -> dict:
    """One trained split's test table, scored per image exactly as its metrics.json (checked), and its timings."""
    model, cfg, _, _ = load_run_model(run_dir, "cpu")
    data = load_data(cfg.data)
    metrics = read_json(run_dir / "metrics.json")
    with seeded_rng(cfg.train.seed, torch.device("cpu")):  # as runs.train_run scored test
        table_, y = log_likelihood_table(model, data.test, cfg.runtime.eval_batch_size, "cpu", draws)
    log_py = model.prior.log_class_probs.detach().double()
    ok, bpd = per_image(table_, y, log_py, model.dim)
    if draws == metrics["test"]["draws"]:  # the same seeded draws as metrics.json: the same numbers
        assert abs(ok.mean() - metrics["test"]["accuracy"]) < 1e-12, (ok.mean(), metrics["test"])
    assert abs(bits_per_dim(table_.double(), y, log_py, model.dim) - bpd.mean()) < 1e-9
    epochs = read_json(run_dir / "history.json")["epochs"]
    return {"data": data, "y": y, "ok": ok, "bpd": bpd, "metrics": metrics,
            "train_s": float(sum(e["epoch_seconds"] for e in epochs))}


def compare_split(split: int, run_root: str, draws: int, reference_root: str | None = None) -> dict:
    flow = flow_split(split, Path(run_root) / f"split{split}", draws)
    metrics, y = flow["metrics"], flow["y"]
    g_table, g_y, g_log_py, info = gaussian_test_table(flow["data"], seed=split, draws=draws)
    assert torch.equal(g_y, y)
    g_ok, g_bpd = per_image(g_table, g_y, g_log_py, info["dim"])
    row = {
        "split": split, "n": len(y), "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"],
        "flow_val_acc": metrics["val"]["accuracy"], "flow_val_bpd": metrics["val"]["bpd_conditional"],
        "flow_acc": float(flow["ok"].mean()), "gauss_acc": float(g_ok.mean()),
        "flow_bpd": float(flow["bpd"].mean()), "gauss_bpd": float(g_bpd.mean()), "ridge": info["ridge"],
        "flow_only": int((flow["ok"] & ~g_ok).sum()), "gauss_only": int((~flow["ok"] & g_ok).sum()),
        "flow_train_s": flow["train_s"],
        "_flow_ok": flow["ok"], "_g_ok": g_ok, "_dbpd": flow["bpd"] - g_bpd,
    }
    if reference_root is not None:
        ref = flow_split(split, Path(reference_root) / f"split{split}", draws)
        assert torch.equal(ref["y"], y)
        row.update({
            "ref_val_acc": ref["metrics"]["val"]["accuracy"], "ref_val_bpd": ref["metrics"]["val"]["bpd_conditional"],
            "ref_best_epoch": ref["metrics"]["best_epoch"], "ref_acc": float(ref["ok"].mean()),
            "ref_bpd": float(ref["bpd"].mean()), "flow_only_vs_ref": int((flow["ok"] & ~ref["ok"]).sum()),
            "ref_only": int((~flow["ok"] & ref["ok"]).sum()), "ref_train_s": ref["train_s"],
            "_ref_ok": ref["ok"], "_dbpd_ref": flow["bpd"] - ref["bpd"],
        })
    return row


def paired(a_ok: np.ndarray, b_ok: np.ndarray, dbpd: np.ndarray) -> dict:
    """Exact McNemar test of a against b on the same images, and a 95% t-interval of the per-image bits/dim a - b."""
    from scipy.stats import binomtest, t

    b, c = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    half = t.ppf(0.975, len(dbpd) - 1) * dbpd.std(ddof=1) / math.sqrt(len(dbpd))
    return {"a_only": b, "b_only": c, "mcnemar_p": float(p), "dbpd_mean": float(dbpd.mean()),
            "dbpd_ci95": [float(dbpd.mean() - half), float(dbpd.mean() + half)]}


def pooled(rows: list[dict]) -> dict:
    cat = lambda key: np.concatenate([r[key] for r in rows])  # noqa: E731
    flow_ok, g_ok = cat("_flow_ok"), cat("_g_ok")
    vs_g = paired(flow_ok, g_ok, cat("_dbpd"))
    out = {
        "n": int(len(flow_ok)), "flow_acc": float(flow_ok.mean()), "gauss_acc": float(g_ok.mean()),
        "flow_only": vs_g["a_only"], "gauss_only": vs_g["b_only"], "mcnemar_p": vs_g["mcnemar_p"],
        "dbpd_mean": vs_g["dbpd_mean"], "dbpd_ci95": vs_g["dbpd_ci95"],
        "flow_bpd": float(np.mean([r["flow_bpd"] for r in rows])), "gauss_bpd": float(np.mean([r["gauss_bpd"] for r in rows])),
        "flow_train_s_mean": float(np.mean([r["flow_train_s"] for r in rows])),
    }
    if "_ref_ok" in rows[0]:
        ref_ok = cat("_ref_ok")
        vs_ref = paired(flow_ok, ref_ok, cat("_dbpd_ref"))
        out["reference"] = {
            "acc": float(ref_ok.mean()), "bpd": float(np.mean([r["ref_bpd"] for r in rows])),
            "flow_only": vs_ref["a_only"], "ref_only": vs_ref["b_only"], "mcnemar_p": vs_ref["mcnemar_p"],
            "dbpd_mean": vs_ref["dbpd_mean"], "dbpd_ci95": vs_ref["dbpd_ci95"],
            "train_s_mean": float(np.mean([r["ref_train_s"] for r in rows])),
            "validation_means": {k: float(np.mean([r[f"ref_{k}"] for r in rows])) for k in ("val_acc", "val_bpd")},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="profile overrides")
    ap.add_argument("--draws", type=int, default=16, help="dequantisation draws per test image (both models)")
    ap.add_argument("--jobs", type=int, default=2, help="splits trained at once (one torch thread each)")
    ap.add_argument("--run-root", default="runs/digits-splits")
    ap.add_argument("--json", help="write the rows and the pooled comparison here")
    ap.add_argument("--reference-set", nargs="*", default=None, metavar="SECTION.FIELD=VALUE",
                    help="also train this configuration (profile overrides; none: the profile) and pair the flow with it")
    ap.add_argument("--reference-run-root", help="where the reference runs go (default: RUN_ROOT-reference)")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    split_config(args.splits[0], args.profile, overrides)  # fail on a bad override before any work
    jobs = [(overrides, args.run_root, "flow")]
    reference_root = None
    if args.reference_set is not None:
        reference = parse_set(args.reference_set)
        split_config(args.splits[0], args.profile, reference)
        reference_root = args.reference_run_root or f"{args.run_root}-reference"
        jobs.append((reference, reference_root, "reference"))
    print(header(1), flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # split by split, each configuration's run side by side
        futures = [(name, pool.submit(train_split, s, args.profile, over, root)) for s in args.splits
                   for over, root, name in jobs]
        for name, f in futures:
            split, wall, trained = f.result()
            print(f"split {split} ({name}): {'trained' if trained else 'reused'} in {wall:.0f} s", flush=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [compare_split(s, args.run_root, args.draws, reference_root) for s in args.splits]
    total = pooled(rows)
    cols = ["split", "n", "best_epoch", "epochs", "flow_val_acc", "flow_val_bpd", "flow_acc", "gauss_acc", "flow_only", "gauss_only", "flow_bpd",
            "gauss_bpd", "ridge", "flow_train_s"]
    print(table([{k: r[k] for k in cols} for r in rows], cols))
    if reference_root is not None:
        ref_cols = ["split", "ref_best_epoch", "ref_val_acc", "ref_val_bpd", "ref_acc", "flow_acc", "flow_only_vs_ref",
                    "ref_only", "ref_bpd", "flow_bpd", "ref_train_s", "flow_train_s"]
        print("\nagainst the reference configuration:\n" + table([{k: r[k] for k in ref_cols} for r in rows], ref_cols))
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
    if reference_root is not None:
        ref = total["reference"]
        lo, hi = ref["dbpd_ci95"]
        print(f"against the reference: flow {100 * total['flow_acc']:.2f}% vs reference {100 * ref['acc']:.2f}%; "
              f"flow right / reference wrong {ref['flow_only']}, the converse {ref['ref_only']}, exact McNemar p = "
              f"{ref['mcnemar_p']:.3g}; bits/dim per-image difference (flow - reference) {ref['dbpd_mean']:+.4f} "
              f"(95% CI {lo:+.4f} .. {hi:+.4f}); validation {100 * ref['validation_means']['val_acc']:.2f}% / "
              f"{ref['validation_means']['val_bpd']:.4f}; training s per split: flow {total['flow_train_s_mean']:.0f}, "
              f"reference {ref['train_s_mean']:.0f}")
    print(f"wall time {time.time() - t0:.0f} s")
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": clean, "pooled": total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
