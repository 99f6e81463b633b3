"""Bias and spread of the log-det estimators *and of their gradients* against the exact values, on a trained digits flow.

Loads a trained digits run (default: the report's fixed run, runs/report/digits-default-seed0-fixed;
`make report` writes it), fixes one batch of test images and one dequantisation draw, and compares,
for each estimator, `draws` independent estimates of the whole flow's summed log|det| and of its
gradient with respect to every flow parameter against the exact ones (per-sample Jacobians,
`Exact`), in float64:
- log-det: bias of the batch-mean per image (mean over draws, with its standard error) and the
  per-image standard deviation of one draw;
- gradient: relative bias ||E[g] - g*|| / ||g*|| and relative spread E||g - E[g]|| / ||g*|| of one draw,
  and the cosine between one draw and g*;
- seconds per estimate (forward + backward).

    .venv/bin/python benchmarks/gradient_accuracy.py [--run-dir DIR] [--draws 40] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table  # noqa: E402
from logdet_accuracy import set_estimator  # noqa: E402

from mixflow_core import Exact, PowerSeries, RussianRoulette  # noqa: E402
from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.training.runs import load_run_model  # noqa: E402

ESTIMATORS = {
    "power series, 5 terms (digits default)": PowerSeries(n_terms=5),
    "power series, 5 terms, Neumann gradient": PowerSeries(n_terms=5, neumann_gradient=True),
    "power series, 10 terms": PowerSeries(n_terms=10),
    "Russian roulette, 2 exact terms": RussianRoulette(n_exact_terms=2),
    "Russian roulette, 2 exact terms, Neumann gradient": RussianRoulette(n_exact_terms=2, neumann_gradient=True),
    "Russian roulette, 5 exact terms, Neumann gradient": RussianRoulette(n_exact_terms=5, neumann_gradient=True),
}


def logdet_and_grad(model, h: torch.Tensor, estimator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(per-image flow log|det| (B,), flattened gradient of its sum w.r.t. the flow's parameters, seconds)."""
    set_estimator(model, estimator)
    params = [p for p in model.flow.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    _, logdet = model.flow(h)
    grads = torch.autograd.grad(logdet.sum(), params, allow_unused=True)
    seconds = time.perf_counter() - t0
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return logdet.detach(), flat, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/report/digits-default-seed0-fixed")
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    model, cfg, _, ckpt = load_run_model(Path(args.run_dir))
    model = model.double().eval()  # eval mode: one fixed function (no power-iteration refresh between draws)
    data = load_data(cfg.data)
    x = data.test.tensors[0][: args.batch].to(torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        h, _ = model.preprocess(x)  # one fixed dequantisation draw
    print(header(args.threads))
    print(f"model: {args.run_dir}/{ckpt.name}, batch {args.batch}, {args.draws} draws per estimator\n")
    exact_ld, exact_g, exact_s = logdet_and_grad(model, h, Exact())
    g_norm = float(exact_g.norm())
    rows = [{"estimator": "exact (per-sample Jacobians)", "logdet bias (nats/img)": 0.0, "bias s.e.": 0.0,
             "logdet sd (nats/img)": 0.0, "grad rel. bias": 0.0, "grad rel. spread": 0.0, "grad cosine": 1.0,
             "s / estimate": exact_s}]
    for label, estimator in ESTIMATORS.items():
        torch.manual_seed(1)
        lds, gs, secs = zip(*(logdet_and_grad(model, h, estimator) for _ in range(args.draws)))
        lds, gs = torch.stack(lds), torch.stack(gs)  # (S, B), (S, P)
        batch_means = (lds - exact_ld).mean(1)  # (S,): error of each draw's batch mean
        mean_g = gs.mean(0)
        rows.append({
            "estimator": label,
            "logdet bias (nats/img)": float(batch_means.mean()),
            "bias s.e.": float(batch_means.std() / args.draws ** 0.5),
            "logdet sd (nats/img)": float((lds - lds.mean(0)).std(0).mean()),
            "grad rel. bias": float((mean_g - exact_g).norm()) / g_norm,
            "grad rel. spread": float((gs - mean_g).norm(dim=1).mean()) / g_norm,
            "grad cosine": float(torch.nn.functional.cosine_similarity(gs, exact_g[None], dim=1).mean()),
            "s / estimate": sum(secs) / len(secs),
        })
        print(f"{label}: done", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
