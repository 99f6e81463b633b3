"""The i-ResNet's sampling path: the fixed-point inverse's tolerance against sampling img/s and what it changes.

Sampling inverts every residual block x + g(x) = z by x_{k+1} = z - g(x_k) until max |x_{k+1} - x_k| < tol
(ResidualBlock.inverse_tol, ModelConfig.inverse_tol, default 1e-6; inverse_max_iter caps it). Each iteration is one
forward of g, so the tolerance sets the cost. For each tolerance, on a trained run's best weights:

- sampling img/s (`model.sample`, per class, the same latents for every tolerance), median over interleaved rounds;
- iterations per block (mean and max over blocks and rounds) and blocks that hit the cap;
- what the looser inverse changes in the output: the fraction of pixels whose quantised level differs from the
  reference tolerance's (the tightest one), and the largest difference in levels;
- how well the sample solves f(x) = z: max |f(h) - z| through the whole flow, h the inverse before quantisation.

    .venv/bin/python benchmarks/iresnet_sampling.py [--run-dir runs/report/fashion-mnist-default-seed0-fixed-iresnet]
        [--tols 1e-6 1e-5 1e-4 1e-3] [--n 32] [--rounds 5] [--threads 2]

Needs a trained i-ResNet run directory (`make report DATASET=fashion-mnist` makes the default one; any run of
`mixflow train --backbone iresnet` will do).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, loadavg, table  # noqa: E402

from mixflow_core.flows.iresnet.network import ResidualBlock  # noqa: E402
from mixflow_core.training.runs import load_run_model  # noqa: E402

DEFAULT_RUNS = ("runs/report/fashion-mnist-default-seed0-fixed-iresnet", "runs/report/digits-default-seed0-fixed")


def blocks(model: torch.nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def invert(model, z: torch.Tensor, tol: float) -> tuple[torch.Tensor, list[int], float]:
    """(h: the flow's inverse of z before the preprocessing's inverse, iterations per block, seconds)."""
    for b in blocks(model):
        b.inverse_tol = tol
    t0 = time.perf_counter()
    with torch.no_grad():
        h = model.flow.inverse(z.reshape(len(z), *model.latent_shape))
    seconds = time.perf_counter() - t0
    return h, [b.last_inverse.iterations for b in blocks(model)], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help=f"a trained i-ResNet run (default: the first of {DEFAULT_RUNS} that exists)")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3],
                    help="inverse tolerances; the first is the reference")
    ap.add_argument("--n", type=int, default=32, help="samples per class per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    run = Path(args.run_dir) if args.run_dir else next((Path(r) for r in DEFAULT_RUNS if Path(r).is_dir()), None)
    if run is None or not run.is_dir():
        sys.exit(f"no i-ResNet run directory: pass --run-dir (tried {args.run_dir or DEFAULT_RUNS})")
    torch.set_num_threads(args.threads)
    model, cfg, info, ckpt = load_run_model(run, "cpu")
    if not blocks(model):
        sys.exit(f"{run} is not an i-ResNet run (no residual blocks): the coupling flow's inverse is analytic")
    k = info["num_classes"]
    print(header(args.threads))
    print(f"run: {run} ({ckpt.name}), {len(blocks(model))} residual blocks, coeff {cfg.model.coeff}, "
          f"inverse_max_iter {cfg.model.inverse_max_iter}; {args.n} samples x {k} classes per round, "
          f"T = {args.temperature}, {args.rounds} rounds, tolerances interleaved\n")
    y = torch.arange(k).repeat_interleave(args.n)
    seconds = {t: [] for t in args.tols}
    iters = {t: [] for t in args.tols}
    changed = {t: [] for t in args.tols}
    level_diff = {t: 0.0 for t in args.tols}
    residual = {t: 0.0 for t in args.tols}
    loads = []
    for r in range(args.rounds):
        loads.append(loadavg())
        z = model.prior.sample(y, args.temperature, torch.Generator().manual_seed(r))
        order = args.tols if r % 2 == 0 else list(reversed(args.tols))
        outs = {}
        for tol in order:
            h, its, s = invert(model, z, tol)
            seconds[tol].append(s)
            iters[tol].extend(its)
            outs[tol] = h
        ref = model.preprocess.inverse(outs[args.tols[0]])
        for tol, h in outs.items():
            x = model.preprocess.inverse(h)
            changed[tol].append(float((x != ref).float().mean()))
            level_diff[tol] = max(level_diff[tol], float((x - ref).abs().max()))
            with torch.no_grad():
                back, _ = model.flow(h)
            back = back.detach()  # (the i-ResNet's forward turns gradients on inside, for its log-det estimator)
            residual[tol] = max(residual[tol], float((back.reshape(len(z), -1) - z).abs().max()))
    rows = []
    base = statistics.median(seconds[args.tols[0]])
    for tol in args.tols:
        med = statistics.median(seconds[tol])
        rows.append({
            "inverse_tol": f"{tol:g}" + (" (reference)" if tol == args.tols[0] else ""),
            "img/s": len(y) / med, "vs reference": base / med,
            "iterations per block (mean)": statistics.fmean(iters[tol]),
            "iterations per block (max)": max(iters[tol]),
            "blocks at the cap": sum(i >= cfg.model.inverse_max_iter for i in iters[tol]),
            "pixels changed vs reference": statistics.fmean(changed[tol]),
            "max level difference": level_diff[tol], "max |f(x) - z|": residual[tol],
        })
    print(table(rows))
    print(f"\nload average (1 min) during rounds: min {min(loads):.2f}, max {max(loads):.2f}")


if __name__ == "__main__":
    main()
