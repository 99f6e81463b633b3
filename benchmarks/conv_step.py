"""Training-step speed of the Fashion-MNIST i-ResNet default conv model under several settings, side by side in one run.

For each setting: images/s of a training step (forward + backward + Adam, batch 64, after a warm-up),
FLOPs per image of one step (torch.utils.flop_counter: matmuls and convolutions, forward and
backward), the achieved GFLOP/s, and that as a fraction of a large float32 matmul's GFLOP/s measured
in the same run. Also the cost of the epoch-end step that makes saved weights keep Lip <= coeff
(converged_spectral_norms) on this model. The data are generated Fashion-MNIST-shaped images
(uint8, 1x28x28): the speed does not depend on their content, and the script needs no dataset.

    .venv/bin/python benchmarks/conv_step.py --threads 2 [--steps 10] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, matmul_gflops, table  # noqa: E402

from mixflow_core import build_model  # noqa: E402
from mixflow_core.flows.iresnet.lipschitz import converged_spectral_norms  # noqa: E402
from mixflow_core.training.config import apply_overrides  # noqa: E402
from mixflow_core.training.profiles import get_profile  # noqa: E402

POWER = {"model.krylov_steps": None}  # power iteration to power_rtol (1e-4) instead of the Krylov refresh
SERIES = {"type": "power_series", "n_terms": 5}
SETTINGS = {  # label -> (overrides of the fashion-mnist default profile, options of the step)
    "issue 11's default (5-term series, power iteration to rtol 1e-4)": ({**POWER, "model.logdet": SERIES}, {}),
    "one power iteration per step": ({**POWER, "model.logdet": SERIES, "model.power_rtol": None}, {}),
    "+ Neumann gradient": ({**POWER, "model.power_rtol": None, "model.logdet": {**SERIES, "neumann_gradient": True}},
                           {}),
    "Russian roulette (2 exact terms) + Neumann, power iteration to rtol 1e-4": (POWER, {}),
    "shipped default: Russian roulette + Neumann, Krylov refresh (12 products)": ({}, {}),
    "shipped default, channels_last": ({}, {"channels_last": True}),
    "Russian roulette + Neumann, one power iteration per step (bound not kept)": ({**POWER, "model.power_rtol": None},
                                                                                  {}),
}


def measure(overrides: dict, steps: int, batch: int, profile: bool, channels_last: bool = False) -> dict:
    cfg = apply_overrides(get_profile("fashion-mnist", "default", "iresnet"), overrides)
    torch.manual_seed(0)
    model = build_model((1, 28, 28), 10, 256, cfg.model, cfg.prior)
    x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
    if channels_last:  # the conv weights and the input in NHWC; the activations follow the input's layout
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        loss = cfg.train.objective(model(x), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up (also ActNorm's data-dependent init)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    t0 = time.perf_counter()
    with converged_spectral_norms(model):
        pass
    converge_s = time.perf_counter() - t0
    img_s = steps * batch / seconds
    return {"img/s": img_s, "MFLOP/img": flops / 1e6, "GFLOP/s": flops * img_s / 1e9, "bound (s)": converge_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step (torch.profiler)")
    ap.add_argument("--only", nargs="*", help="settings whose label starts with one of these")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    peak = matmul_gflops()
    rows = []
    for label, (overrides, options) in SETTINGS.items():
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        row = {"setting": label, **measure(overrides, args.steps, args.batch, args.profile, **options)}
        row["of matmul peak"] = row["GFLOP/s"] / peak
        rows.append(row)
        print(f"{label}: {row['img/s']:.1f} img/s", flush=True)
    base = rows[0]["img/s"]
    for r in rows:
        r["vs first"] = r["img/s"] / base
    print(f"\nfloat32 matmul 1024x1024: {peak:.1f} GFLOP/s\n")
    print(table(rows, ["setting", "img/s", "vs first", "MFLOP/img", "GFLOP/s", "of matmul peak", "bound (s)"]))


if __name__ == "__main__":
    main()
