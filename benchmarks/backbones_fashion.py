"""Fashion-MNIST: the two backbones at equal CPU time — the hybrid frontier, and the long (bar) runs.

Every run is the Fashion-MNIST default profile with overrides, a seed and a wall-clock budget
(runtime.max_minutes, checked after every batch), trained by runs.ensure_run into
RUN_ROOT/<name>: a finished run is reused, an interrupted one (kill -9 included) resumed from its
checkpoint, so the script can be stopped and rerun at any time. Its metrics are those of
metrics.json: val (6,000) and the full official test set (10,000).

Both backbones share the preprocessing (dequantisation, logit alpha 0.05, bits/dim of the 256
integer bins) and the prior: learned diagonal class Gaussians started at zero means / unit
scales (the issue-21 setting under which the i-ResNet already beats the Gaussian's density).

Plans (`--plan`):
- frontier: objective beta in {0, 0.01, 0.1, 1} (loss = NLL/D + beta * CE) x {coupling, i-ResNet},
  --minutes each (default 5), seed 0, constant lr 1e-3, no early stopping: the budget decides, and
  the metrics are those of the weights at the end of the last complete epoch inside it (best.pt; the
  budget-cut partial epoch is validated but not eligible, as in fit; a run that completes no epoch,
  e.g. the i-ResNet in 5 minutes, is scored at its budget-cut weights, checkpoint.pt). Plus the per-class Gaussian and logistic regression as points (fit once, cached).
- bar: the long runs of issue 21 (see BAR below), 2 seeds each, --minutes each (default 20).

Per run it records val/test accuracy and bits/dim, the training images/s (the batches only,
without validation), the learning curve (val bits/dim and accuracy against images seen, one point
per epoch) and the 1-minute load average at the start and end. Results: --out (JSON, rewritten
after every run) and the same name with .md.

    .venv/bin/python benchmarks/backbones_fashion.py --plan frontier [--minutes 5] [--threads 2]
    .venv/bin/python benchmarks/backbones_fashion.py --plan bar --minutes 20
    .venv/bin/python benchmarks/backbones_fashion.py --figure       # the README's figure from the committed tables
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
from _common import header, loadavg, table  # noqa: E402

from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.eval.baselines import gaussian_baseline, sklearn_baselines  # noqa: E402
from mixflow_core.study import plotting  # noqa: E402
from mixflow_core.training.config import apply_overrides  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402
from mixflow_core.training.runs import ensure_run, read_config  # noqa: E402

# pinned rather than read from the profile (which these runs chose; it moved to them on 2026-12-06), so the committed
# runs stay resumable: the prior (moments_ridge unused by init="zeros", kept as the runs have it) and the schedule
LEARNED_DIAGONAL = {"prior.init": "zeros", "prior.learn_means": True, "prior.learn_scales": True,
                    "prior.covariance": "diagonal", "prior.moments_ridge": 1e-3, "train.schedule": "constant",
                    "runtime.patience": 3}
BACKBONES = {  # overrides of the fashion-mnist default i-ResNet profile per backbone
    "coupling": {"model.arch": "coupling_conv"},
    "iresnet": {},
}
BETAS = (0.0, 0.01, 0.1, 1.0)
# the long runs: (name, backbone, overrides). beta from the frontier's validation points (coupling: 0.1, the beta
# nearest both bars at 5 minutes; i-ResNet: 0.1, the one beating the Gaussian and near logistic regression there);
# a cosine lr over a fixed number of epochs sized to end inside the budget at the frontier's slowest throughput
# (coupling 835 img/s: 17 x ~68 s; i-ResNet 167 img/s: 4 epochs, the last one cut by the budget), best weights on
# validation bits/dim
BAR: list[tuple[str, str, dict]] = [
    ("coupling-beta0.1-cosine", "coupling", {"train.objective.beta": 0.1, "train.schedule": "cosine",
                                             "runtime.epochs": 17, "train.early_stopping": "val_bpd",
                                             "runtime.patience": 100}),
    ("iresnet-beta0.1-cosine", "iresnet", {"train.objective.beta": 0.1, "train.schedule": "cosine",
                                           "runtime.epochs": 4, "train.early_stopping": "val_bpd",
                                           "runtime.patience": 100}),
]


def run_config(backbone: str, overrides: dict, seed: int, minutes: float, threads: int):
    # the i-ResNet profile with the architecture switched (coupling: the shared model fields kept, the i-ResNet ones
    # reset), so both backbones share everything else; the coupling profile itself is the outcome of these runs
    cfg = apply_overrides(get_profile("fashion-mnist", "default", "iresnet"), {**BACKBONES[backbone], **LEARNED_DIAGONAL})
    budget = {"train.seed": seed, "runtime.max_minutes": minutes, "runtime.threads": threads,
              "runtime.progress": False, "runtime.epochs": 1000, "train.early_stopping": "none"}
    return apply_overrides(cfg, {**budget, **overrides})


def curve(history: dict, batch_size: int, batches_per_epoch: int) -> list[dict]:
    """Val bits/dim and accuracy against images seen, one point per (possibly budget-cut) epoch record; a resumed
    epoch's later record counts its batches from that epoch's start, like History.steps."""
    before, seen, last, points = 0, 0, None, []
    for e in history["epochs"]:
        if e["epoch"] != last:
            before, last = seen, e["epoch"]
        seen = before + (e["batches"] if e.get("partial") else batches_per_epoch) * batch_size
        points.append({"images": seen, "seconds": e["epoch_seconds"], "val_bpd": e["val_bpd"],
                       "val_acc": e["val_acc"]})
    return points


def train_one(name: str, backbone: str, overrides: dict, seed: int, minutes: float, threads: int,
              run_root: Path) -> dict:
    cfg = run_config(backbone, overrides, seed, minutes, threads)
    load0, t0 = loadavg(), time.time()
    history, metrics, trained = ensure_run(cfg, run_root / name, "default")
    n_train = read_config(run_root / name)[2]["n_train"]
    points = curve(history, cfg.train.batch_size, n_train // cfg.train.batch_size)  # fit drops the last partial batch
    train_s = sum(e["epoch_seconds"] for e in history["epochs"])
    return {
        "name": name, "backbone": backbone, "beta": cfg.train.objective.beta if hasattr(cfg.train.objective, "beta")
        else 0.0, "seed": seed, "minutes": minutes, "threads": threads, "overrides": overrides,
        "test_acc": metrics["test"]["accuracy"], "test_bpd": metrics["test"]["bpd_conditional"],
        "val_acc": metrics["val"]["accuracy"], "val_bpd": metrics["val"]["bpd_conditional"],
        "epochs": len(history["epochs"]), "best_epoch": history["best_epoch"], "stopped": history["stopped"],
        "images_seen": points[-1]["images"], "train_s": train_s, "img_per_s": points[-1]["images"] / train_s,
        "curve": points, "load_start": load0, "load_end": loadavg(),
        "wall_s": time.time() - t0, "trained_now": trained,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def baselines(threads: int) -> list[dict]:
    data = load_data(get_profile("fashion-mnist", "default", "iresnet").data)
    g = gaussian_baseline(data, seed=0)
    rows = [{"method": g["method"], "test_acc": g["accuracy"], "test_bpd": g["bpd_conditional"],
             "val_acc": g["val_accuracy"], "val_bpd": g["val_bpd_conditional"]}]
    for r in sklearn_baselines(data, 0, methods=("logistic",)):
        rows.append({"method": r["method"], "test_acc": r["accuracy"], "test_bpd": None,
                     "val_acc": r["val_accuracy"], "val_bpd": None})
    return rows


def plan(name: str, minutes: float, seeds: list[int]) -> list[tuple[str, str, dict, int]]:
    if name == "frontier":
        return [(f"frontier-{b}-beta{beta:g}-{minutes:g}min", b, {"train.objective.beta": beta}, 0)
                for beta in BETAS for b in BACKBONES]
    return [(f"bar-{n}-{minutes:g}min-seed{s}", b, o, s) for n, b, o in BAR for s in seeds]


COLUMNS = ["name", "backbone", "beta", "seed", "minutes", "test_acc", "test_bpd", "val_acc", "val_bpd", "epochs",
           "best_epoch", "images_seen", "img_per_s", "load_start", "load_end"]


def write(out: Path, doc: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    md = ["\n\n".join(doc["headers"]), "", table(doc["runs"], COLUMNS)]
    if doc.get("baselines"):
        md += ["", "Baselines (same splits):", "", table(doc["baselines"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def draw_frontier(folder: Path) -> Path:
    """The README's frontier figure from the committed tables (notebook 04 draws the same from the same files)."""
    frontier = json.loads((folder / "fashion-mnist-frontier.json").read_text())
    bar = folder / "fashion-mnist-bar.json"
    runs = frontier["runs"] + (json.loads(bar.read_text())["runs"] if bar.is_file() else [])
    fig = plotting.fig_frontier(runs, frontier.get("baselines", []),
                                "Fashion-MNIST, 2 CPU threads: hybrid frontier (5 min) and the 20-min runs")
    return plotting.save_figure(fig, folder / "fashion-mnist-frontier.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", choices=("frontier", "bar"), default="frontier")
    ap.add_argument("--minutes", type=float, default=None, help="budget per run (default: frontier 5, bar 20)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="bar plan: seeds")
    ap.add_argument("--only", nargs="*", default=None, help="run only these run names (substring match)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-root", default="runs/backbones")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/backbones/fashion-mnist-<plan>.json)")
    ap.add_argument("--figure", action="store_true", help="only draw the frontier (with the bar runs, when their "
                    "table exists) into benchmarks/backbones/fashion-mnist-frontier.png, training nothing")
    args = ap.parse_args()
    if args.figure:
        print(f"wrote {draw_frontier(Path('benchmarks/backbones'))}")
        return
    minutes = args.minutes or (5.0 if args.plan == "frontier" else 20.0)
    out = Path(args.out or f"benchmarks/backbones/fashion-mnist-{args.plan}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    doc.setdefault("headers", [doc.pop("header")] if "header" in doc else []).append(header(args.threads))
    print(doc["headers"][-1] + "\n", flush=True)  # one header per invocation: command, machine, load
    done = {r["name"] for r in doc["runs"]}
    for name, backbone, overrides, seed in plan(args.plan, minutes, args.seeds):
        if name in done or (args.only and not any(o in name for o in args.only)):
            continue
        print(f"{datetime.datetime.now():%H:%M:%S} {name} ...", flush=True)
        row = train_one(name, backbone, overrides, seed, minutes, args.threads, Path(args.run_root))
        doc["runs"].append(row)
        write(out, doc)
        print(table([row], COLUMNS) + "\n", flush=True)
    if args.plan == "frontier" and not doc.get("baselines"):  # after the runs: the logistic grid takes minutes
        doc["baselines"] = baselines(args.threads)
        write(out, doc)
    print(table(doc["runs"], COLUMNS))
    if doc.get("baselines"):
        print("\n" + table(doc["baselines"]))


if __name__ == "__main__":
    main()
