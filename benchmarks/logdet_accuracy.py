"""Log-det estimators on a 64-D digits i-ResNet: error against the exact Jacobian, and time per step.

Trains the default digits-sized model (10 blocks, 64-128-128-64 LipSwish MLP, coeff 0.9)
briefly by maximum likelihood so its Jacobians are not trivially small, then on one fixed
batch of 64 test images compares each estimator's whole-flow log|det| (sum over blocks)
with the exact value (per-sample slogdet of the full Jacobian per block, float64):
bias of the batch mean (mean over draws, with its standard error) and per-sample RMS
error. Also times one training step (forward + backward, float32) per estimator.

    .venv/bin/python benchmarks/logdet_accuracy.py [--train-steps 2000] [--draws 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from sklearn.datasets import load_digits

from mixflow_core import ActNorm, Exact, ModelConfig, PowerSeries, PriorConfig, ResidualBlock, RussianRoulette, build_model
from mixflow_core.eval.tables import markdown_table
from mixflow_core.flows.objectives import likelihood


def blocks(model) -> list[ResidualBlock]:
    return [m for m in model.flow.layers if isinstance(m, ResidualBlock)]


def set_estimator(model, estimator) -> None:
    for b in blocks(model):
        b.logdet = b.eval_logdet = estimator


def step_time(model, x, y, estimator, steps: int) -> float:
    """Seconds per forward + backward of the likelihood loss in training mode."""
    set_estimator(model, estimator)
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = likelihood(model.log_prob_all(x), y, model.prior.log_class_probs, model.dim)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if i:  # first step warms up
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--time-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32)  # (1797, 64), levels 0..16
    y_all = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))
    train_idx, test_idx = perm[:1437], perm[1437:]

    model = build_model((64,), 10, 17, ModelConfig(), PriorConfig(), torch.bincount(y_all[train_idx], minlength=10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.train_steps):
        idx = train_idx[torch.randint(len(train_idx), (64,))]
        loss = likelihood(model.log_prob_all(x_all[idx]), y_all[idx], model.prior.log_class_probs, 64)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        test_bpd = model.bits_per_dim(x_all[test_idx], y_all[test_idx]).mean().item()
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {args.threads}")
    print(f"# trained {args.train_steps} steps x 64 in {train_s:.1f} s; test bpd (5-term estimator) {test_bpd:.3f}")

    x_b, y_b = x_all[test_idx[:64]], y_all[test_idx[:64]]
    model.double()  # reference and errors in float64
    with torch.no_grad():
        h, _ = model.preprocess(x_b.double())
        set_estimator(model, Exact())
        _, exact = model.flow(h)  # (B,)
        # ActNorm's log-det (-sum log_scale per vector) is exact and input-independent in every row;
        # the estimators differ on the residual blocks only
        residual = exact - sum(-m.log_scale.sum() for m in model.flow.layers if isinstance(m, ActNorm))
    print(f"# exact whole-flow log|det J_f| over the batch: mean {exact.mean():.3f} nats, of which residual "
          f"blocks {residual.mean():.3f} (range [{residual.min():.3f}, {residual.max():.3f}])")

    estimators = {
        "power series, 1 term": PowerSeries(1),
        "power series, 2 terms": PowerSeries(2),
        "power series, 3 terms": PowerSeries(3),
        "power series, 5 terms": PowerSeries(5),
        "power series, 10 terms": PowerSeries(10),
        "power series, 5 terms, 4 probes": PowerSeries(5, n_probes=4),
        "Russian roulette (2 + Geom(0.5))": RussianRoulette(2),
    }
    rows = []
    for name, est in estimators.items():  # all errors first: training-mode timing refreshes spectral norms
        set_estimator(model, est)
        with torch.no_grad():
            errs = torch.stack([model.flow(h)[1] - exact for _ in range(args.draws)])  # (R, B)
        batch_bias = errs.mean(1)  # (R,)
        bias, se = batch_bias.mean().item(), (batch_bias.std() / args.draws**0.5).item()
        rows.append((name, bias, se, errs.pow(2).mean().sqrt().item()))
    model.float()
    exact_step = step_time(model, x_b, y_b, Exact(), args.time_steps)
    times = [step_time(model, x_b, y_b, est, args.time_steps) for est in estimators.values()]

    table = [[name, f"{bias:+.4f} ± {se:.4f}", f"{rms:.3f}", f"{1e3 * t:.1f}", f"{exact_step / t:.1f}x faster"]
             for (name, bias, se, rms), t in zip(rows, times)]
    table.append(["exact (64 backward passes per block)", 0, 0, f"{1e3 * exact_step:.1f}", "1.0x"])
    print("\n" + markdown_table(["estimator", "bias of batch mean (nats/sample)", "per-sample RMS error (nats)",
                                 "train step (ms)", "vs exact"], table))


if __name__ == "__main__":
    main()
