"""What the batched power-iteration refresh costs on the digits default model, and why.

The power-iteration rule (krylov_steps=None: 1 iteration, then more to rtol 1e-4) was the default until
2026-12-01; the Krylov refresh that replaced it is measured by refresh_policy.py.

1. Training: `--steps` Adam steps of -log p(x|y) (batch 64) on digits; per step the time inside
   refresh_spectral_norms, the whole step's time, the batched power-iteration calls and the member-iterations
   (members x iterations) they did.
2. The batched matrix-vector product of the linear groups' shapes, two ways: bmm(W, v as a column) and
   v as a row times W^T (what _Group uses), microseconds per call.

    .venv/bin/python benchmarks/refresh_cost.py [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, timed  # noqa: E402

import mixflow_core.flows.iresnet as iresnet  # noqa: E402
import mixflow_core.flows.iresnet.lipschitz as lipschitz  # noqa: E402
from mixflow_core import build_model  # noqa: E402
from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.training.config import apply_overrides  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402


def training(steps: int) -> dict:
    cfg = apply_overrides(get_profile("digits", "default"), {"model.krylov_steps": None})
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
    spent, members = [0.0], []
    refresh, iterate = iresnet.refresh_spectral_norms, lipschitz._Group.iterate

    timed_refresh = timed(refresh, spent)
    def counted_iterate(group):
        members.append(len(group.layers))
        return iterate(group)

    iresnet.refresh_spectral_norms, lipschitz._Group.iterate = timed_refresh, counted_iterate
    try:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True)
        model.train()
        done, t0 = 0, time.perf_counter()
        while done < steps:
            for x, y in loader:
                loss = -model.log_prob(x, y).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        seconds = time.perf_counter() - t0
    finally:
        iresnet.refresh_spectral_norms, lipschitz._Group.iterate = refresh, iterate
    return {"steps": steps, "step ms": 1000 * seconds / steps, "refresh ms/step": 1000 * spent[0] / steps,
            "batched calls/step": len(members) / steps, "member-iterations/step": sum(members) / steps,
            "spectral layers": len(lipschitz.spectral_layers(model))}


def _per_call(f, *args, repeats: int = 2000) -> float:
    """Microseconds per call of f(*args), after one warm-up call."""
    f(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        f(*args)
    return 1e6 * (time.perf_counter() - t0) / repeats


def _column(w, v):
    return torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)


def _row(w, v):
    return torch.matmul(v.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


def matvec() -> list[dict]:
    rows = []
    for shape in ((10, 128, 128), (10, 128, 64), (10, 64, 128)):
        w, v = torch.randn(*shape), torch.randn(shape[0], shape[2])
        column, row = _per_call(_column, w, v), _per_call(_row, w, v)
        rows.append({"stack (G, out, in)": str(shape), "bmm, column (us)": column, "row @ W^T (us)": row,
                     "speed-up": column / row})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads) + "\n")
    print(table([training(args.steps)]) + "\n")
    print(table(matvec()))


if __name__ == "__main__":
    main()
