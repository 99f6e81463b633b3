"""The evaluation log-det estimator of a trained image flow against the exact log-det, image by image.

For a handful of test images (one fixed dequantisation draw each) the exact log|det J_f| of the
whole flow (`logdet.Exact`: per-block Jacobians by jacrev + slogdet; at 784-D affordable for a
few images) is compared with the mean of `--draws` independent draws of the run's eval estimator
(e.g. Russian roulette: unbiased, so the mean must agree within its standard error). Prints one
row per image and the pooled bias in bits/dim, so a reader can see that the bits/dim the study
reports are an honest (unbiased) estimate of the dequantised bound, not a truncation artefact.

    .venv/bin/python benchmarks/logdet_check_784.py --run-dir runs/report/fashion-mnist-default-seed0-fixed
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, table  # noqa: E402

from mixflow_core.data import load_data  # noqa: E402
from mixflow_core.flows.iresnet import ResidualBlock  # noqa: E402
from mixflow_core.flows.iresnet.logdet import Exact  # noqa: E402
from mixflow_core.training.runs import load_run_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--images", type=int, default=4, help="test images (the first N)")
    ap.add_argument("--draws", type=int, default=200, help="draws of the stochastic estimator per image")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args.threads))
    model, cfg, info, path = load_run_model(args.run_dir, "cpu")
    model = model.double()
    data = load_data(cfg.data)
    x = torch.stack([data.test[i][0] for i in range(args.images)]).double()
    torch.manual_seed(0)
    h, pre_ld = model.preprocess(x)  # one fixed dequantisation draw (eval mode keeps the noise)
    blocks = [m for m in model.flow.modules() if isinstance(m, ResidualBlock)]
    estimator = blocks[0].eval_logdet
    print(f"model: {path}, {len(blocks)} residual blocks, eval estimator {estimator}, {args.images} images, "
          f"{args.draws} draws, float64")

    def whole_logdet() -> torch.Tensor:
        with torch.enable_grad():
            return model.flow(h)[1].detach()

    t0 = time.perf_counter()
    draws = torch.stack([whole_logdet() for _ in range(args.draws)])  # (draws, N)
    est_s = (time.perf_counter() - t0) / args.draws
    for b in blocks:
        b.eval_logdet = Exact()
    t0 = time.perf_counter()
    exact = whole_logdet()
    exact_s = time.perf_counter() - t0
    d = math.prod(info["data_shape"])
    rows = []
    for i in range(args.images):
        mean, se = draws[:, i].mean(), draws[:, i].std() / math.sqrt(args.draws)
        rows.append({"image": i, "exact log-det (nats)": float(exact[i]), "estimator mean": float(mean),
                     "difference": float(mean - exact[i]), "s.e.": float(se), "difference / s.e.": float((mean - exact[i]) / se),
                     "sd of one draw": float(draws[:, i].std())})
    print(table(rows))
    bias = (draws.mean(0) - exact).mean()
    se = draws.mean(1).std() / math.sqrt(args.draws)  # batch mean per draw: its spread across draws
    to_bpd = 1.0 / (d * math.log(2))
    print(f"pooled bias {float(bias):.4g} ± {float(se):.3g} nats/image = {float(bias) * to_bpd:.2e} ± {float(se) * to_bpd:.1e} "
          f"bits/dim; one draw's sd {float(draws.std(0).mean()) * to_bpd:.2e} bits/dim per image")
    print(f"time: {est_s:.3f} s per draw of {args.images} images, exact {exact_s:.1f} s")


if __name__ == "__main__":
    main()
