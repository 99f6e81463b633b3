"""How many power iterations per training step keep Lip(layer) <= coeff *during* training, and what each costs.

The saved and evaluated weights are exact whatever the per-step rule (fit converges the vectors first,
RESULTS.md "The Lipschitz bound on saved weights"). During training, the step's forward uses
W_hat = W / max(1, sigma_est / coeff), with sigma_est from warm-started power iteration; if that lags, the
operator norm of W_hat drifts past coeff (toward or past 1, where x + g(x) stops being invertible and the
log-det series stops converging). This script trains the digits `default` model (its Hybrid objective, Adam at
the profile's lr without decay: the harshest part of its schedule) under several per-step rules, from the same
initial weights and batches, and after every step's forward records the *exact* operator norm (batched
matrix 2-norm) of every layer's W_hat as the step used it. Per rule: the largest over steps and layers, the largest
over layers at the last step, the fraction of steps in which some layer exceeded coeff + 0.01, the time in the
refresh and per step (the exact norms are outside both timers).

    .venv/bin/python benchmarks/refresh_policy.py [--steps 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, loadavg, table, timed  # noqa: E402

import mixflow_core.flows.iresnet as iresnet  # noqa: E402
from mixflow_core import build_model  # noqa: E402
from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.flows.iresnet.lipschitz import spectral_layers  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402

# label -> the spectral layers' per-step settings: power iteration (n iterations, then more until sigma settles to
# power_rtol, at most 50 more) or a Krylov subspace of krylov_steps products (lipschitz._Group.krylov)
POWER = {"krylov_steps": None, "power_rtol": None}
POLICIES = {
    "power: 1 iteration, tolerance 1e-4 (the default until 2026-12-01)": {**POWER, "n_power_iterations": 1,
                                                                           "power_rtol": 1e-4},
    "power: 1 iteration, tolerance 1e-3": {**POWER, "n_power_iterations": 1, "power_rtol": 1e-3},
    "power: 1 iteration": {**POWER, "n_power_iterations": 1},
    "power: 2 iterations": {**POWER, "n_power_iterations": 2},
    "power: 5 iterations": {**POWER, "n_power_iterations": 5},
    "power: 10 iterations": {**POWER, "n_power_iterations": 10},
    "Krylov, 6 products": {"krylov_steps": 6},
    "Krylov, 8 products": {"krylov_steps": 8},
    "Krylov, 12 products (the default)": {"krylov_steps": 12},
    "Krylov, 16 products": {"krylov_steps": 16},
}


@torch.no_grad()
def exact_norms(layers) -> torch.Tensor:
    """Operator norm of each linear layer's W_hat exactly as the last forward used it (its current u, v)."""
    out = []
    for layer in layers:
        w_hat = layer.weight / torch.clamp(layer.sigma() / layer.coeff, min=1.0)
        out.append(torch.linalg.matrix_norm(w_hat.double(), ord=2))
    return torch.stack(out)


def run(label: str, settings: dict, steps: int) -> dict:
    cfg = get_profile("digits", "default")
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    layers = spectral_layers(model)
    for layer in layers:
        for name, value in settings.items():
            setattr(layer, name, value)
    coeff = layers[0].coeff
    spent = [0.0]
    refresh = iresnet.refresh_spectral_norms

    timed_refresh = timed(refresh, spent)
    iresnet.refresh_spectral_norms = timed_refresh
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True, generator=gen)
    log_py = model.prior.log_class_probs
    worst, over, step_s, last = 0.0, 0, 0.0, torch.zeros(1)
    model.train()
    try:
        done = 0
        while done < steps:
            for x, y in loader:
                t0 = time.perf_counter()
                loss = cfg.train.objective(model(x), y, log_py, model.dim)
                t1 = time.perf_counter()
                last = exact_norms(layers)  # W_hat as this step's forward used it; not timed
                t2 = time.perf_counter()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step_s += (t1 - t0) + (time.perf_counter() - t2)
                worst = max(worst, float(last.max()))
                over += int(bool((last > coeff + 0.01).any()))
                done += 1
                if done == steps:
                    break
    finally:
        iresnet.refresh_spectral_norms = refresh
    return {"rule": label, "steps": steps, "max norm (all steps)": worst, "max norm (last step)": float(last.max()),
            "steps with a layer > coeff + 0.01": over / steps, "refresh ms/step": 1000 * spent[0] / steps,
            "step ms": 1000 * step_s / steps, "final loss": float(loss.detach()), "load": loadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="rules whose label starts with one of these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads) + "\n", flush=True)
    rows = []
    for label, settings in POLICIES.items():
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        rows.append(run(label, settings, args.steps))
        print(table(rows[-1:]), flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
