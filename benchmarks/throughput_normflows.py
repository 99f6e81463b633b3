"""Training-step throughput on digits: mixflow's MixtureFlow vs normflows' Residual flow (same architecture).

Both models: dequantisation + logit(alpha 0.05) of 64-D digits (outside normflows, inline ops),
10 x [ActNorm, residual block x + g(x)], g a 64-128-128-64 MLP of spectrally normalised linear
layers (coeff 0.9) with LipSwish, a class-conditional diagonal Gaussian prior, loss = mean
-log p(x|y), Adam(lr 1e-3), batch 64, float32, same torch thread count. One step = forward,
loss, zero_grad, backward, optimizer step (+ normflows' explicit power-iteration update).

Mapping of normflows settings (normflows 1.7.3, nf.flows.Residual / nf.nets.LipschitzMLP):
- log-det: `n_power_series=5` = our PowerSeries(n_terms=5) (truncated, coefficients 1, no
  Russian roulette), `exact_trace=False` (Hutchinson, one Gaussian probe as ours),
  `brute_force=False` (only applies to 2-D); `n_exact_terms` is unused when n_power_series is set.
- gradient: `reduce_memory=False` -> basic estimator, backprop through the 5 VJPs (create_graph)
  = ours with neumann_gradient=False (default). `reduce_memory=True` -> Neumann-series gradient
  computed inside forward (memory-saving) ~ ours with neumann_gradient=True; both are timed.
- `--estimator roulette`: both sides Russian roulette with 2 exact terms and Geometric(0.5) extra
  terms (normflows: n_power_series=None, n_exact_terms=2, geom_p=0.5; ours: RussianRoulette()),
  the estimator our Fashion-MNIST and digits defaults train with.
- spectral norm: normflows' forward does *no* power iteration (compute_weight(update=False));
  the user calls nf.utils.update_lipschitz(model, n) after each step; we call it with n = 1
  (`--nf-power-iterations`). Ours: the default Krylov refresh (12 products with W^T W per layer
  per step), the previous default (1 power iteration, then more to rtol 1e-4), or exactly 1
  power iteration (which lets the operator norm drift past coeff; RESULTS.md).
- architecture differences we cannot remove: normflows' LipschitzMLP puts its (learnable-beta)
  Swish before every linear layer (3 activations: act-lin-act-lin-act-lin) and zero-inits the
  last layer; ours is lin-act-lin-act-lin with a fixed LipSwish. ActNorm: nf.flows.ActNorm((64,)).
  Prior: nf.distributions.ClassCondDiagGaussian(64, 10) in nf.ClassCondFlow.forward_kld.

`--conv`: the same comparison for a conv residual flow on 1x28x28 images at 256 levels (random
Fashion-MNIST-shaped data; speed does not depend on content): 4 x [ActNorm, x + g(x)] at one
scale, g = conv 3x3 (1 -> 32) - LipSwish - conv 1x1 (32 -> 32) - LipSwish - conv 3x3 (32 -> 1),
each spectrally normalised as an operator (ours: Conv(channels=32, n_blocks=4, n_scales=1);
normflows: nf.nets.LipschitzCNN([1, 32, 32, 1], [3, 1, 3]), act-conv-act-conv-act-conv).

Timing: every variant runs `--steps` steps per round, variants interleaved, `--rounds` rounds;
samples/s from the median round. `--profile` adds a cProfile / torch.profiler breakdown of ours.

    .venv/bin/python benchmarks/throughput_normflows.py [--rounds 7] [--steps 20] [--threads 1] [--profile] [--conv]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, loadavg, table  # noqa: E402

from mixflow_core import MLP, Conv, ModelConfig, PowerSeries, PriorConfig, build_model  # noqa: E402
from mixflow_core.flows.iresnet.logdet import RussianRoulette  # noqa: E402
from mixflow_core.data import DataConfig, load_data  # noqa: E402
from mixflow_core.flows.objectives import likelihood  # noqa: E402
from mixflow_core.training.config import TrainConfig  # noqa: E402
from mixflow_core.training.fit import make_optimizer  # noqa: E402

ALPHA = 0.05
SHAPES = {False: ((64,), 17), True: ((1, 28, 28), 256)}  # --conv: (per-sample shape, levels)


SPECTRAL = {  # our per-step spectral-norm rule -> ModelConfig fields
    "krylov": {},  # the default
    "rtol": {"krylov_steps": None, "power_rtol": 1e-4},
    "one": {"krylov_steps": None, "power_rtol": None},
}


def ours(spectral: str, neumann: bool, class_counts: torch.Tensor, conv: bool, estimator: str,
         shipped_optimizer: bool = False):
    """Our model and its training step; `shipped_optimizer`: fit's own (make_optimizer: fused Adam since issue 22;
    the other rows keep the default foreach Adam, as normflows does, so their ratios stay comparable with earlier
    runs)."""
    arch = Conv(channels=32, n_blocks=4, n_scales=1, kernel_size=3) if conv else MLP(hidden=(128, 128), n_blocks=10)
    logdet = (RussianRoulette(n_exact_terms=2, neumann_gradient=neumann) if estimator == "roulette"
              else PowerSeries(n_terms=5, n_probes=1, neumann_gradient=neumann))
    cfg = ModelConfig(arch=arch, coeff=0.9, logdet=logdet, **SPECTRAL[spectral])
    shape, levels = SHAPES[conv]
    model = build_model(shape, 10, levels, cfg, PriorConfig(init="separated"), class_counts)
    opt = (make_optimizer(model, TrainConfig(lr=1e-3)) if shipped_optimizer
           else torch.optim.Adam(model.parameters(), lr=1e-3))

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        model.train()
        loss = likelihood(model.log_prob_all(x), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return model, step


def theirs(nf, reduce_memory: bool, power_iterations: int, conv: bool, estimator: str):
    shape, levels = SHAPES[conv]
    flows = []
    for _ in range(4 if conv else 10):
        if conv:
            net = nf.nets.LipschitzCNN([1, 32, 32, 1], [3, 1, 3], lipschitz_const=0.9,
                                       max_lipschitz_iter=power_iterations, init_zeros=True)
        else:
            net = nf.nets.LipschitzMLP([64, 128, 128, 64], lipschitz_const=0.9, max_lipschitz_iter=power_iterations,
                                       init_zeros=True)
        series = dict(n_power_series=None, n_exact_terms=2, geom_p=0.5) if estimator == "roulette" else dict(
            n_power_series=5)
        flows += [nf.flows.Residual(net, reduce_memory=reduce_memory, exact_trace=False, brute_force=False, n_samples=1,
                                    **series),
                  nf.flows.ActNorm((1, 1, 1) if conv else (64,))]
    model = nf.ClassCondFlow(nf.distributions.ClassCondDiagGaussian(shape, 10), flows)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dim = math.prod(shape)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        model.train()
        h, logdet_pre = preprocess(x, levels)
        loss = (model.forward_kld(h, y) - logdet_pre.mean()) / dim  # same per-dimension scaling as ours
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        nf.utils.update_lipschitz(model, power_iterations)
        return float(loss.detach())

    return model, step


def preprocess(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dequantisation + logit as mixflow's LogitPreprocess."""
    x = x.float()
    s = ALPHA + (1 - 2 * ALPHA) * (x + torch.rand_like(x)) / levels
    h = torch.log(s) - torch.log1p(-s)
    dims = tuple(range(1, x.dim()))
    logdet = (math.log(1 - 2 * ALPHA) - torch.log(s) - torch.log1p(-s)).sum(dims) - x[0].numel() * math.log(levels)
    return h, logdet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="training steps per variant per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nf-power-iterations", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also profile our default step (cProfile + torch.profiler)")
    ap.add_argument("--conv", action="store_true", help="the conv variant at 1x28x28 (see the docstring)")
    ap.add_argument("--estimator", choices=("series", "roulette"), default="series",
                    help="log-det estimator on both sides: 5-term series or Russian roulette (2 exact terms)")
    args = ap.parse_args()
    try:
        import normflows as nf
    except ImportError:
        print("normflows is not installed; `.venv/bin/pip install normflows` to run this benchmark. Skipping.")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(header(args.threads))
    print(f"normflows {nf.__version__}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps per variant, "
          f"interleaved\n")
    if args.conv:  # random Fashion-MNIST-shaped images: the step's speed does not depend on their content
        x_all = torch.randint(0, 256, (2048, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        y_all = torch.arange(2048) % 10
        counts = torch.bincount(y_all, minlength=10)
    else:
        data = load_data(DataConfig("digits", seed=0))
        x_all, y_all = data.train.tensors
        counts = data.class_counts()
    c, e = args.conv, args.estimator
    print(f"log-det estimator on both sides: {e}\n")
    variants = {
        "mixflow default (Krylov refresh)": ours("krylov", False, counts, c, e),
        "mixflow power iteration to rtol 1e-4": ours("rtol", False, counts, c, e),
        "mixflow 1 power it. (bound not kept)": ours("one", False, counts, c, e),
        "normflows reduce_memory=False": theirs(nf, False, args.nf_power_iterations, c, e),
        "mixflow default + neumann_gradient": ours("krylov", True, counts, c, e),
        "mixflow power it. to rtol 1e-4 + neumann_gradient": ours("rtol", True, counts, c, e),
        "mixflow 1 power it. + neumann_gradient": ours("one", True, counts, c, e),
        "mixflow default + neumann_gradient + fused Adam (as shipped)": ours("krylov", True, counts, c, e,
                                                                            shipped_optimizer=True),
        "normflows reduce_memory=True (Neumann grad.)": theirs(nf, True, args.nf_power_iterations, c, e),
    }
    n_params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in variants.items()}
    gen = torch.Generator().manual_seed(0)

    def batch():
        idx = torch.randint(len(y_all), (args.batch_size,), generator=gen)
        return x_all[idx], y_all[idx]

    for _, step in variants.values():
        for _ in range(args.warmup):
            step(*batch())
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads = []
    for _ in range(args.rounds):
        loads.append(loadavg())
        for name, (_, step) in variants.items():
            batches = [batch() for _ in range(args.steps)]
            t0 = time.perf_counter()
            for xb, yb in batches:
                step(xb, yb)
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["normflows reduce_memory=False"])
    ref_neu = statistics.median(times["normflows reduce_memory=True (Neumann grad.)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        base = ref_neu if "neumann" in name.lower() or "Neumann" in name else ref
        rows.append({
            "variant": name, "params": n_params[name], "ms/step (median)": 1000 * med / args.steps,
            "ms/step (min)": 1000 * min(ts) / args.steps, "samples/s": args.batch_size * args.steps / med,
            "speed vs normflows (same gradient)": base / med,
        })
    print(table(rows))
    print(f"\nload average (1 min) during rounds: min {min(loads):.2f}, max {max(loads):.2f}")
    if args.profile:
        profile_ours(variants["mixflow default + neumann_gradient + fused Adam (as shipped)" if e == "roulette" else
                              "mixflow default (Krylov refresh)"][1], batch, args.steps)


def profile_ours(step, batch, steps: int) -> None:
    import cProfile
    import io
    import pstats

    batches = [batch() for _ in range(steps)]
    prof = cProfile.Profile()
    prof.enable()
    for xb, yb in batches:
        step(xb, yb)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
    print("\n### cProfile of mixflow default, cumulative\n\n```\n" + s.getvalue()[-6000:] + "\n```")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for xb, yb in batches:
            step(xb, yb)
    print("\n### torch.profiler of mixflow default, by self CPU time\n\n```\n"
          + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20) + "\n```")


if __name__ == "__main__":
    main()
