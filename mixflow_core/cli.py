"""Command line: ``python -m mixflow_core`` (or ``mixflow``) train | evaluate | sample | ablate | report.

Results go to stdout; progress goes through logging (-v info, -vv debug with tracebacks).
Bad input exits with status 2 and one line on stderr. Run directories: see training/runs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from .data import classes_tag, load_data
from .study.ablation import STUDENT_BACKBONE, ablate, markdown_table
from .study.report import ReportError, plan, run_report
from .study.widgets import fig_class_samples
from .training.fit import NonFiniteLossError
from .training.profiles import BACKBONES, DATASETS, DEFAULT_BACKBONE, PROFILES, get_profile, other_backbone
from .training.runs import (
    CONFIG, HISTORY, METRICS, RunError, check_same_data, dataset_info, device_or_error, evaluate_seeded,
    load_run_model, merge_config, one_line, parse_set, read_config, read_config_file, refuse_resume_changes, train_run,
    write_json,
)

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  mixflow train --dataset digits --profile smoke --set runtime.epochs=5 model.dequantize=false
  mixflow train --dataset digits --set model.logdet=russian_roulette model.arch.hidden=[64,64] train.objective.beta=8
  mixflow train --run-dir runs/digits-smoke-seed0 --resume --set runtime.epochs=20
  mixflow evaluate runs/digits-smoke-seed0 --split val
  mixflow sample runs/digits-smoke-seed0 --classes 0 1 2 --n 8 --temperature 0.7 --out grid.png
  mixflow ablate --dataset digits --epochs 30 --seeds 0 1
  mixflow report                     # digits, default profile: reports/ and figures/ in ~6-11 CPU-minutes
  mixflow report --profile full --dataset fashion-mnist --device cuda
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (status 2) instead of a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: log progress; -vv: debug, with tracebacks")
    return common


def _set_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="SECTION.FIELD=VALUE",
                        help=f"{what}, e.g. train.lr=3e-4 model.arch.hidden=[64,64] model.logdet.n_terms=3 "
                        "runtime.epochs=20; values parse as JSON, else as strings")


def _add_train(sub, common) -> None:
    t = sub.add_parser("train", parents=[common], help="train a model into a run directory",
                       description="Train a model. Config precedence: "
                       "profile < --config < --set < --device/--seed/--data-root.")
    t.add_argument("--dataset", choices=DATASETS, help="required unless --run-dir DIR --resume")
    t.add_argument("--profile", choices=PROFILES,
                   help="smoke (seconds), default (CPU) or full (GPU scale); default: default")
    _backbone_argument(t)
    t.add_argument("--config", metavar="FILE", help="JSON (or YAML, with PyYAML) file {section: {field: value}}; "
                   "a run's config.json works too")
    _set_argument(t, "override fields")
    t.add_argument("--run-dir", type=Path, help="output directory (default: runs/<dataset>-<profile>-seed<N>)")
    t.add_argument("--resume", action="store_true",
                   help="continue --run-dir from its checkpoint.pt with its config.json; only runtime.* "
                   "(epochs, max_minutes, patience, device, threads, ...) and data.root / data.download may change")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto (sets runtime.device)")
    t.add_argument("--seed", type=int,
                   help="sets train.seed: weight init, batch order, noise (data.seed fixes the split)")
    t.add_argument("--data-root", help="directory with the dataset files (sets data.root)")


def _run_dir_parser(sub, common, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A command that reads a trained run: RUN_DIR and --device (default: the run's own)."""
    parser = sub.add_parser(name, parents=[common], help=help, description=description)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--device", help="default: the run's runtime.device")
    return parser


def _add_evaluate(sub, common) -> None:
    e = _run_dir_parser(sub, common, "evaluate", "metrics of a trained run on the test or validation split",
                        "Rebuild the model from RUN_DIR/config.json, load best.pt (else checkpoint.pt) and write "
                        "accuracy, bits/dim (conditional, marginal), ECE and the confusion matrix as JSON.")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--out", type=Path, help="metrics JSON (default: RUN_DIR/eval-<split>.json)")
    e.add_argument("--seed", type=int, help="seed of dequantisation noise and probes (default: the run's train.seed, "
                   "which reproduces metrics.json)")
    e.add_argument("--draws", type=int, help="dequantisation draws averaged per image (importance-weighted bound; "
                   "needs an exact eval log-det); default: the run's runtime.eval_draws")
    e.add_argument("--data-root", help="where the dataset files are now (default: the run's data.root)")


def _add_sample(sub, common) -> None:
    s = _run_dir_parser(sub, common, "sample", "PNG of samples per class",
                        "Sample z ~ N(mu_y, T^2 sigma_y^2), x = f^-1(z): a grid with one row per class (images), "
                        "or a scatter plot coloured by class (2-D data).")
    s.add_argument("--classes", type=int, nargs="+", help="class indices, one row each (default: all)")
    s.add_argument("--n", type=int, default=8, help="samples per class (default 8)")
    s.add_argument("--temperature", type=float, default=0.7, help="T, scales the prior's std (default 0.7)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling torch.Generator (default 0)")
    s.add_argument("--out", type=Path, help="image file (default: RUN_DIR/samples.png)")


def _dataset_and_profile(parser: argparse.ArgumentParser, dataset_default: str | None, profile_help: str,
                         backbone: bool = True) -> None:
    """--dataset (required when there is no default), --profile (default: default) and, if `backbone`, --backbone."""
    parser.add_argument("--dataset", choices=DATASETS, default=dataset_default, required=dataset_default is None,
                        help=f"default: {dataset_default}" if dataset_default else None)
    parser.add_argument("--profile", choices=PROFILES, default="default", help=f"{profile_help} (default: default)")
    if backbone:
        _backbone_argument(parser)


def _backbone_argument(parser: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{d}: {b}" for d, b in DEFAULT_BACKBONE.items())
    parser.add_argument("--backbone", choices=BACKBONES,
                        help=f"the profile's backbone family, i-ResNet or affine coupling (default per dataset: {defaults})")


def _backbone_tag(dataset: str, backbone: str | None) -> str:
    """"-coupling" etc. in default directory names when a backbone other than the dataset's default is named."""
    return f"-{backbone}" if backbone not in (None, DEFAULT_BACKBONE[dataset]) else ""


def _add_ablate(sub, common) -> None:
    a = sub.add_parser("ablate", parents=[common], help="the student's configuration, then one factor at a time",
                       description="Train the student configuration (the original student model's choices), one "
                       "variant per factor changed toward the fix, and the dataset profile itself, with the same seeds "
                       "and budget; the backbone is a factor too (the student on the other family's architecture, and "
                       "that family's profile). Write OUT/ablation.json and OUT/ablation.md. Rerunning skips finished rows.")
    _dataset_and_profile(a, None, "architecture and data", backbone=False)
    a.add_argument("--backbone", choices=BACKBONES, default=STUDENT_BACKBONE,
                   help="the base profile's backbone family, on which the student's configuration is built (default: "
                   f"{STUDENT_BACKBONE}, the original student's, whatever the dataset's default)")
    a.add_argument("--no-backbone-factor", action="store_true",
                   help="leave out the two variants on the other backbone family")
    a.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, each run for every variant (default 0)")
    a.add_argument("--epochs", type=int, default=30, help="epochs per run, no early stopping (default 30)")
    a.add_argument("--max-minutes", type=float, help="wall-clock budget per run")
    a.add_argument("--max-steps", type=int, help="optimiser-step budget per run (the same for every variant, whatever "
                   "the machine's load)")
    _set_argument(a, "override fields of the base profile (as for train)")
    a.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (names as in the table)")
    a.add_argument("--data-root", help="directory with the dataset files (sets data.root)")
    a.add_argument("--out", type=Path, help="output directory (default: runs/ablation-<dataset>-<profile>)")


def _class_list(text: str) -> list[str | int]:
    """'shirt,T-shirt/top' -> ['shirt', 'T-shirt/top']; integers become labels ('4,9' -> [4, 9])."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if len(items) < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 comma-separated classes, got {text!r}")
    return [int(t) if t.isdigit() else t for t in items]


def _add_report(sub, common) -> None:
    r = sub.add_parser("report", parents=[common], help="run the notebook sequence headlessly (papermill)",
                       description="Execute notebooks/01-04 with papermill: train the fixed and the student "
                       "configuration (reusing finished runs), diagnose overlap, sample, and write the results "
                       "table. Executed notebooks go to --reports-dir, figures and the table to --figures-dir.")
    _dataset_and_profile(r, "digits", "smoke (seconds), default (CPU) or full (GPU scale)", backbone=False)
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    r.add_argument("--seed", type=int, default=0, help="training seed of both configurations (default 0)")
    r.add_argument("--data-root", help="directory with the dataset files (fashion-mnist, cifar10)")
    r.add_argument("--reports-dir", type=Path, default=Path("reports"), help="executed notebooks (default reports/)")
    r.add_argument("--figures-dir", type=Path,
                   help="figures and results table (default figures/ for digits-default, else figures/<dataset>-<profile>)")
    r.add_argument("--runs-dir", type=Path, default=Path("runs/report"), help="run directories (default runs/report)")
    r.add_argument("--ablation", type=Path, metavar="JSON",
                   help="ablation.json to include (default: benchmarks/ablation/<dataset>-<profile>.json if present)")
    r.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    r.add_argument("--baselines", choices=("full", "fast", "none"), default=None,
                   help="baseline tuning (default: full on digits / toy2d, fast on the image sets)")
    r.add_argument("--classes", type=_class_list, metavar="A,B,...",
                   help="study only these classes, by name or label, comma-separated (e.g. 'shirt,T-shirt/top,pullover' "
                   "or 4,9); relabelled 0..K'-1 in that order")
    r.add_argument("--no-tsne", action="store_true", help="skip t-SNE (PCA only)")
    r.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output (epochs) to the terminal")


def build_parser() -> argparse.ArgumentParser:
    """The `mixflow` parser: one sub-parser per command (_add_train, _add_evaluate, ...)."""
    common = _common()
    p = _Parser(prog="mixflow", description="Mixture flows: i-ResNet flows with a class-conditional Gaussian prior "
                "that generate and classify.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,evaluate,sample,ablate,report}")
    for add in (_add_train, _add_evaluate, _add_sample, _add_ablate, _add_report):
        add(sub, common)
    return p


def _summary(split: str, m: dict) -> str:
    return (f"{split}: accuracy {m['accuracy']:.4f}, bits/dim {m['bpd_conditional']:.4f} (conditional) / "
            f"{m['bpd_marginal']:.4f} (marginal), ECE {m['ece']:.4f}, n={m['n']}")


def _train(args: argparse.Namespace) -> int:
    overrides = {**(read_config_file(args.config) if args.config else {}), **parse_set(args.set)}
    flags = {"runtime.device": args.device, "train.seed": args.seed, "data.root": args.data_root}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    profile, fresh, saved_info = args.profile or "default", None, None
    if not (args.resume and args.run_dir):
        if args.dataset is None:
            raise RunError("train needs --dataset (or --run-dir DIR --resume to continue a run)")
        fresh = merge_config(get_profile(args.dataset, profile, args.backbone), overrides)
    elif args.backbone is not None:
        raise RunError("--backbone chooses a profile for a new run; a resumed run keeps its saved architecture")
    run_dir = args.run_dir or Path("runs") / (f"{fresh.data.name}-{profile}{_backbone_tag(fresh.data.name, args.backbone)}"
                                              f"{classes_tag(fresh.data.name, fresh.data.classes)}-seed{fresh.train.seed}")
    if args.resume:  # the saved config is the base; config.resume_conflicts says what may change
        saved, profile, saved_info = read_config(run_dir)
        if args.dataset not in (None, saved.data.name) or args.profile not in (None, profile):
            raise RunError(f"{run_dir} holds a {saved.data.name} run with profile {profile}; "
                           "--dataset/--profile disagree")
        cfg = merge_config(saved, overrides)
        refuse_resume_changes(saved, cfg, run_dir, "--resume reuses")
    else:
        cfg = fresh
    try:
        history, metrics = train_run(cfg, run_dir, profile, resume=args.resume, saved_info=saved_info)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: mixflow train --run-dir {run_dir} --resume", file=sys.stderr)
        return 130
    if history is None:  # not rank 0 under torchrun
        return 0
    ckpt = metrics["checkpoint"]
    files = [f for f in (CONFIG, HISTORY, METRICS, "checkpoint.pt", "best.pt") if (run_dir / f).exists()]
    print(f"run directory: {run_dir} ({', '.join(files)})")
    print(f"trained {len(history.epochs)} epochs ({history.stopped}); "
          f"metrics use {ckpt} (epoch {history.best_epoch})")
    print(_summary("val", metrics["val"]))
    print(_summary("test", metrics["test"]))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    model, cfg, info, ckpt = load_run_model(args.run_dir, args.device)
    data_cfg = cfg.data if args.data_root is None else dataclasses.replace(cfg.data, root=args.data_root)
    data = load_data(data_cfg)
    check_same_data(info, dataset_info(data), args.run_dir)
    torch.set_num_threads(cfg.runtime.threads)
    seed = cfg.train.seed if args.seed is None else args.seed
    device = model.prior.means.device
    draws = cfg.runtime.eval_draws if args.draws is None else args.draws
    m = evaluate_seeded(model, getattr(data, args.split), seed, cfg.runtime.eval_batch_size, device, draws)
    out = args.out or args.run_dir / f"eval-{args.split}.json"
    write_json(out, {"run_dir": str(args.run_dir), "split": args.split, "checkpoint": ckpt.name,
                     "eval_seed": seed, **m})
    print(f"{args.run_dir} ({ckpt.name}) {_summary(args.split, m)}")
    print(f"wrote {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    model, cfg, info, ckpt = load_run_model(args.run_dir, args.device)
    shape, levels = tuple(info["data_shape"]), info["levels"]
    classes = list(range(info["num_classes"])) if args.classes is None else args.classes
    torch.set_num_threads(cfg.runtime.threads)
    # widgets.fig_class_samples validates classes, n, temperature and seed (ValueError: one line, status 2)
    fig = fig_class_samples(model, classes, args.n, args.temperature, args.seed, shape, levels, info["class_names"])
    out = args.out or args.run_dir / "samples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out)
    what = "scatter plot" if levels is None else f"grid, rows = classes {classes}, {args.n} columns"
    print(f"wrote {out}: {args.n} samples per class at T={args.temperature:g}, seed {args.seed} ({what}; {ckpt.name})")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    overrides = parse_set(args.set)
    if args.data_root is not None:
        overrides["data.root"] = args.data_root
    base = merge_config(get_profile(args.dataset, args.profile, args.backbone), overrides)  # the student's by default
    if args.epochs < 1:
        raise RunError(f"--epochs must be >= 1, got {args.epochs}")
    tag = "" if args.backbone == STUDENT_BACKBONE else f"-{args.backbone}"
    out = args.out or Path("runs") / f"ablation-{args.dataset}-{args.profile}{tag}"
    if args.max_steps is not None and args.max_steps < 1:
        raise RunError(f"--max-steps must be >= 1, got {args.max_steps}")
    other = None
    if not args.no_backbone_factor:  # the other family's profile; overrides of the model section belong to base's
        other = merge_config(get_profile(args.dataset, args.profile, other_backbone(base.model.family)),
                             {k: v for k, v in overrides.items() if not k.startswith("model.")})
    rows = ablate(base, out, tuple(args.seeds), args.epochs, args.max_minutes,
                  tuple(args.only) if args.only else None, max_steps=args.max_steps, other=other)
    print(markdown_table(rows))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    device_or_error(args.device)
    steps = plan(args.dataset, args.profile, args.device, args.seed, args.reports_dir, args.figures_dir, args.runs_dir,
                 args.data_root, args.retrain, args.ablation, tsne=not args.no_tsne, baselines=args.baselines,
                 classes=args.classes)
    summary = run_report(steps, stream=not args.quiet)
    print(f"report finished in {summary['seconds'] / 60:.1f} min")
    print(f"executed notebooks: {Path(steps[-1].output).parent}/ ({', '.join(Path(s.output).name for s in steps)})")
    print(f"figures: {summary['figures_dir']}/")
    print(f"results table: {summary['table_md']}\n")
    print(summary["table"])
    print(f"browsable report (executed notebooks as HTML, results table): {summary['index_html']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mixflow` / `python -m mixflow_core`.

    Returns 0; on failure prints one line to stderr and raises SystemExit(2) (bad input) or
    SystemExit(1) (training diverged).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mixflow_core").setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)])
    try:
        commands = {"train": _train, "evaluate": _evaluate, "sample": _sample, "ablate": _ablate, "report": _report}
        return commands[args.command](args)
    except NonFiniteLossError as err:  # training diverged: not bad input, but no traceback either
        _fail(err, 1)
    except (ValueError, OSError) as err:  # RunError, CheckpointError, DatasetNotFoundError, config validation
        _fail(err, 2)
    except ReportError as err:  # a notebook failed; the message names the cell and the partial output
        _fail(err, 1)


def _fail(err: BaseException, code: int):
    logger.debug("details", exc_info=err)
    print(f"mixflow: error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(code)

