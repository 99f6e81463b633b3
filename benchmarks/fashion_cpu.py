"""Fashion-MNIST on CPU: the smoke profile end to end, and a timed short run of the default profile.

(a) smoke: load_data -> build_model -> fit -> metrics.evaluate on the full test set (10,000).
(b) default profile for `--minutes` of training (RuntimeConfig.max_minutes, checked after each
    epoch): to fit the budget, the training set is cut (stratified, `--train-limit`; auto: from
    the measured step speed so that ~`--epochs` epochs fit) and runtime.epochs set to `--epochs`.
    Reports training images/s, then test accuracy / conditional and marginal bits/dim on
    `--test-limit` test images (first N of the official test set; 0 = all), with the evaluation
    time measured, in eval mode with the profile's eval log-det estimator (eval_logdet None: the training
    power series, 5 terms, one Hutchinson probe; bits/dim are therefore estimates).

    .venv/bin/python benchmarks/fashion_cpu.py [--minutes 10] [--threads 1] [--test-limit 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch.utils.data import Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, loadavg, table  # noqa: E402

from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.eval.metrics import evaluate  # noqa: E402
from mixflow_core.flows.model import build_model  # noqa: E402
from mixflow_core.training.config import apply_overrides  # noqa: E402
from mixflow_core.training.fit import fit  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402
from mixflow_core.training.runs import parse_set  # noqa: E402


def run(cfg, label: str, test_limit: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    data = load_data(cfg.data)
    load_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    load0, w0, c0 = loadavg(), time.perf_counter(), time.process_time()
    history = fit(model, data, cfg.train, cfg.runtime)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    train_s = sum(e["epoch_seconds"] for e in history.epochs)  # the batches only, without validation
    n_batches = len(data.train) // cfg.train.batch_size
    images = len(history.epochs) * n_batches * cfg.train.batch_size
    test = data.test if not test_limit else Subset(data.test, range(min(test_limit, len(data.test))))
    torch.manual_seed(10_000 + seed)
    t0 = time.perf_counter()
    m = evaluate(model, test, batch_size=cfg.runtime.eval_batch_size)
    eval_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for e in history.epochs:
        print(f"  {label}: epoch {e['epoch']}: train_loss {e['train_loss']:.4g}, val_bpd {e['val_bpd']:.4f}, "
              f"val_acc {e['val_acc']:.4f}, epoch_seconds {e['epoch_seconds']:.1f}", flush=True)
    best = history.epochs[(history.best_epoch or len(history.epochs)) - 1]  # fit returns these weights
    return {
        "run": label, "params": params, "train_n": len(data.train), "epochs": len(history.epochs),
        "stopped": history.stopped, "best_epoch": history.best_epoch, "images_seen": images,
        "img_per_s": images / train_s, "fit_wall_s": wall,
        "fit_cpu_s": cpu, "val_acc": best["val_acc"], "val_bpd": best["val_bpd"],
        "test_n": m["n"], "test_acc": m["accuracy"], "test_bpd": m["bpd_conditional"],
        "test_bpd_marginal": m["bpd_marginal"],
        "eval_s": eval_s, "eval_img_per_s": m["n"] / eval_s, "data_load_s": load_s, "load_1min": load0,
    }


def step_speed(cfg, steps: int = 6) -> float:
    """Training images/s of the profile's model, measured on a few steps (after one warm-up)."""
    data = load_data(apply_overrides(cfg, {"data.train_limit": 2000}).data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    objective = cfg.train.objective  # Likelihood, Hybrid(beta) or PushAway(lam): a callable
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x, y = data.train.tensors[0][: cfg.train.batch_size], data.train.tensors[1][: cfg.train.batch_size]
    model.train()
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = objective(model(x), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of the default-profile run")
    ap.add_argument("--epochs", type=int, default=3, help="epochs the budget is split into (auto train limit)")
    ap.add_argument("--train-limit", type=int, default=None, help="training examples (default: auto from speed)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all 10,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="overrides of the default profile by dotted name, JSON values, e.g. train.objective.beta=1")
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads) + "\n")
    rows = []
    if not args.skip_smoke:
        cfg = apply_overrides(get_profile("fashion-mnist", "smoke", "iresnet"), {"runtime.threads": args.threads})
        t0 = time.perf_counter()
        row = run(cfg, "smoke", 0)
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"smoke config: {json.dumps(cfg.to_dict())}\n", flush=True)
    if not args.skip_default:
        cfg = get_profile("fashion-mnist", "default", "iresnet")
        cfg = apply_overrides(cfg, {"runtime.threads": args.threads, "runtime.progress": False, **parse_set(args.set)})
        speed = step_speed(cfg)
        limit = args.train_limit
        if limit is None:  # ~epochs epochs in the budget; validation (10% of it, forward only) costs little
            # per epoch: 0.9 L training images at `speed`, 0.1 L validation images (forward only, ~1.2x faster)
            limit = int(60 * args.minutes / args.epochs / (0.9 / speed + 0.1 / (1.2 * speed)) / 1.05)
        # max_minutes is checked after each epoch, so stop one epoch early if the next would overrun
        cfg = apply_overrides(cfg, {"data.train_limit": limit, "runtime.epochs": args.epochs,
                                    "runtime.max_minutes": args.minutes * (args.epochs - 1) / args.epochs})
        print(f"default profile: measured {speed:.1f} train img/s in a short probe -> train_limit {limit} "
              f"(train {int(limit * 0.9)} / val {limit - int(limit * 0.9)}), {args.epochs} epochs\n"
              f"config: {json.dumps(cfg.to_dict())}\n", flush=True)
        t0 = time.perf_counter()
        label = f"default{' + ' + ' '.join(args.set) if args.set else ''}, {args.minutes:g} min budget"
        row = run(cfg, label, args.test_limit)
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
    print(table(rows, ["run", "params", "train_n", "epochs", "stopped", "best_epoch", "images_seen", "img_per_s",
                       "fit_wall_s",
                       "fit_cpu_s", "val_acc", "val_bpd", "test_n", "test_acc", "test_bpd", "test_bpd_marginal",
                       "eval_s", "eval_img_per_s", "total_s", "load_1min"]))
    print(f"\nuniform model: {math.log2(256):.0f} bits/dim; val_acc / val_bpd are those of the best epoch "
          "(early stopping on val_bpd restores its weights), the ones the test columns evaluate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
