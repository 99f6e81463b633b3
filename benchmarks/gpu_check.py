"""GPU device check: one prepared run of seven steps on one GPU, every result in OUT/gpu_check.json.

The steps (STEPS, numbered 0 to 6), each with its own time budget (a hard limit, Check.budget), each recorded as
ok / failed / skipped (with the reason and the tail of a traceback) and its seconds; the JSON is rewritten after
every step, so a run cut short keeps what it finished. The limits add up to 490 s + 2 x --minutes (the two
Fashion-MNIST trainings: 12.2 min at the default 2 minutes), plus 300 s where the report runs:

0. environment  python, torch, CUDA / cuDNN versions, device name, capability, memory, git commit if available
1. pytest       `python -m pytest -m cuda -q -rs tests/test_cuda.py` (else `-m cuda` over tests/ but
                tests/study and this check's own test): counts and the tail of its output (at most 2 minutes)
2. fashion      the fashion-mnist i-ResNet `full` profile trained for --minutes (runtime.max_minutes) on the device:
                training images/s, then test accuracy and bits/dim on the full 10k test set (evaluate), evaluation
                seconds, peak GPU memory
3. fashion_coupling  the same for the coupling flow's `full` profile (both backbones in one prepared call)
4. cifar        CIFAR-10-shaped random data (uint8 3x32x32, 10 classes) at the cifar10 `full` model size: training
                images/s and peak memory at batch 64 and 256 (warm-up steps, then timed steps between
                torch.cuda.synchronize calls; about a minute)
5. precision    the i-ResNet `full` model's training precisions (fp32, tf32, bf16): img/s, the Lipschitz bound, syncs
6. report       `python -m mixflow_core report --profile smoke --device DEVICE`, only where papermill and jupyter
                import (skipped otherwise)

--tiny is the CPU dry run of the same plumbing at smoke sizes, on generated files where the real ones are absent
(tests/test_gpu_check.py runs it). Also written: OUT/gpu_check.log (what is printed), OUT/pytest_cuda.txt and
OUT/report.txt (the subprocesses' whole output), OUT/report/ (the smoke report, when it runs).

    make gpu-data                              # here: copies the Fashion-MNIST idx files into data/fashion-mnist/
    bash benchmarks/gpu_check.sh $OUT          # on the GPU machine (sets PYTHONPATH, tees OUT/console.log)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT [--minutes 3] [--skip report ...]
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gc    # CPU dry run: ~20 s, +70 s report
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import importlib.util
import json
import logging
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package without installing it (PYTHONPATH=. does the same)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table  # noqa: E402

STEPS = ("environment", "pytest", "fashion", "fashion_coupling", "cifar", "precision", "report")
REPORT_MISSING = "papermill/jupyter not installed on this machine"
REPORT_MODULES = ("papermill", "nbclient", "jupyter_client", "jupyter_core", "ipykernel", "nbconvert")  # executing + HTML
FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CUDA_TESTS = ROOT / "tests" / "test_cuda.py"
GIB = 2**30

log = logging.getLogger("gpu_check")


class Skip(Exception):
    """The step does not apply here; the message says why."""


class StepFailed(Exception):
    """The step ran and its result is wrong (what it measured stays in its record)."""


class StepTimeout(Exception):
    """The step ran past its time budget."""


# -- small helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise StepTimeout in the main thread after `seconds` (SIGALRM; a no-op where there is none)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise StepTimeout(f"ran past its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def json_safe(obj: Any) -> Any:
    """NaN / inf as None, tuples as lists, anything else unknown as str: the JSON always writes."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    """Atomically (a temporary file, then os.replace): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n")
    os.replace(tmp, path)


def tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def sub_env() -> dict[str, str]:
    """The subprocesses' environment: this checkout first on PYTHONPATH, a headless matplotlib."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(cmd: list[str], timeout: float, transcript: Path) -> tuple[int | None, str]:
    """(return code, stdout + stderr) of cmd run from the repository root; None when it ran past `timeout`.

    Runs in its own process group, which is killed whole on a timeout (the report's notebook kernels too).
    The whole output goes to `transcript`.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    except BaseException:  # the step's deadline (or ^C) while waiting: leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    transcript.write_text(f"$ {' '.join(cmd)}\n{output}")
    return rc, output or ""


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def idx_bytes(a: np.ndarray) -> bytes:
    """The idx format: magic 0x000008 ndim (uint8 data), big-endian uint32 dims, the raw bytes."""
    header_ = (0x00000800 | a.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header_ + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)  # every class present: stratified splits work


def write_fake_fashion(folder: Path, n_train: int = 240, n_test: int = 100, seed: int = 0) -> Path:
    """Four gzipped Fashion-MNIST idx files of random images (the real format, tiny sizes) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), balanced_labels(n_train, rng),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), balanced_labels(n_test, rng))
    for stem, a in zip(FASHION_STEMS, arrays):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(a)))
    return folder


def write_fake_cifar(root: Path, n_per_batch: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch} of random uint8 images: torchvision's pickle layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": [int(v) for v in balanced_labels(n_per_batch, rng)], b"batch_label": b"synthetic"}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def has_fashion(root: Path) -> bool:
    dirs = (root, root / "FashionMNIST" / "raw")
    return all(any((d / n).is_file() for d in dirs for n in (s, s + ".gz")) for s in FASHION_STEMS)


def cuda_device(device: torch.device) -> bool:
    return device.type == "cuda"


def reset_peak(device: torch.device) -> None:
    if cuda_device(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if not cuda_device(device):
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def sync(device: torch.device) -> None:
    if cuda_device(device):
        torch.cuda.synchronize(device)


# -- the steps ------------------------------------------------------------------------------------------
class Check:
    """The run: arguments, the record (OUT/gpu_check.json), and one method per step filling its own record."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.tiny = args, args.tiny
        self.out = Path(args.out)
        self.path = self.out / "gpu_check.json"
        self.t0 = time.perf_counter()
        self.record: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py", "argv": sys.argv[1:],
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "tiny": self.tiny, "device": args.device, "minutes": args.minutes, "fashion_root": args.fashion_root,
            "steps": {name: {"status": "pending"} for name in STEPS}, "total_seconds": None, "finished": False,
        }

    def budget(self, name: str) -> float:
        """Seconds a step may take (its hard limit; subprocesses get a little less)."""
        if name in ("fashion", "fashion_coupling"):
            return (min(self.args.minutes, 1.0) * 60 + 60) if self.tiny else self.args.minutes * 60 + 75
        return {"environment": 60, "pytest": 120, "cifar": 60 if self.tiny else 80, "precision": 60 if self.tiny else 80,
                "report": 300}[name]

    def save(self) -> None:
        self.record["total_seconds"] = time.perf_counter() - self.t0
        write_json(self.path, self.record)

    def run(self, name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        rec: dict[str, Any] = {"status": "running"}
        budget = self.budget(name)
        if name in self.args.skip:
            rec = {"status": "skipped", "reason": "--skip", "seconds": 0.0}
        else:
            log.info("== %s (budget %.0f s)", name, budget)
            self.record["steps"][name] = rec
            self.save()
            t0 = time.perf_counter()
            try:
                with deadline(budget):
                    fn(rec)
                rec["status"] = "ok"
            except Skip as err:
                rec.update(status="skipped", reason=str(err))
            except Exception as err:  # one step's failure never stops the others
                rec.update(status="failed", reason=f"{type(err).__name__}: {err}".strip(),
                           traceback=tail(traceback.format_exc(), 30))
            finally:
                if torch.cuda.is_available():
                    with contextlib.suppress(Exception):
                        torch.cuda.empty_cache()
            rec["seconds"] = time.perf_counter() - t0
            rec["budget_s"] = budget
        self.record["steps"][name] = rec
        self.save()
        log.info("-- %s: %s (%.1f s)%s", name, rec["status"], rec["seconds"],
                 f": {rec['reason']}" if rec.get("reason") else "")
        return rec

    def device(self) -> torch.device:
        from mixflow_core.training.distributed import resolve_device

        return resolve_device(self.args.device)

    # 0 -------------------------------------------------------------------------------------------------
    def environment(self, rec: dict[str, Any]) -> None:
        rec.update(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
                   cpus=os.cpu_count(), torch=torch.__version__, numpy=np.__version__, cuda_build=torch.version.cuda,
                   cuda_available=torch.cuda.is_available(),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   git_commit=git("rev-parse", "HEAD"), git_dirty=None,
                   report_modules={m: importlib.util.find_spec(m) is not None for m in REPORT_MODULES})
        status = git("status", "--porcelain")
        rec["git_dirty"] = None if status is None else bool(status)
        try:
            from mixflow_core.version import __version__

            rec["mixflow_version"] = __version__
        except Exception as err:  # the package does not import: later steps will say so too
            rec["mixflow_import_error"] = f"{type(err).__name__}: {err}"
        if torch.cuda.is_available():
            rec["device_count"] = torch.cuda.device_count()
        device = self.device()  # ValueError when --device cuda finds no CUDA: recorded as this step's failure
        rec["resolved_device"] = str(device)
        if cuda_device(device):
            props = torch.cuda.get_device_properties(device)
            rec.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=props.total_memory / GIB, multiprocessors=props.multi_processor_count,
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
            rec["nvidia_smi"] = None
            if shutil.which("nvidia-smi"):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                    rec["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
        else:
            rec["device_name"] = platform.processor() or platform.machine()
        log.info("python %s, torch %s (CUDA %s, cuDNN %s), device %s: %s%s, git %s", rec["python"], rec["torch"],
                 rec["cuda_build"], rec["cudnn"], device, rec["device_name"],
                 f" (sm {rec['capability']}, {rec['memory_gib']:.1f} GiB)" if "capability" in rec else "",
                 rec["git_commit"] or "n/a")

    # 1 -------------------------------------------------------------------------------------------------
    def pytest(self, rec: dict[str, Any]) -> None:
        cuda_tests = Path(self.args.cuda_tests)
        cuda_tests = cuda_tests if cuda_tests.is_absolute() else ROOT / cuda_tests
        if cuda_tests.is_file():
            targets = [str(cuda_tests)]
        elif self.tiny:  # the dry run runs inside tests/test_gpu_check.py: never collect the whole suite from there
            raise Skip(f"{self.args.cuda_tests} does not exist (the dry run collects nothing else)")
        else:  # every test marked cuda; the notebook tests need packages the device machine may lack
            targets = ["tests", "--ignore=tests/test_gpu_check.py", "--ignore=tests/study",
                       "--continue-on-collection-errors"]
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *targets]
        timeout = self.budget("pytest") - 10
        rec["command"] = " ".join(["python", *cmd[1:]])
        rc, output = run_command(cmd, timeout, self.out / "pytest_cuda.txt")
        rec.update(returncode=rc, counts=pytest_counts(output), output_tail=tail(output))
        log.info("%s", tail(output, 15))
        counts = rec["counts"]
        if rc is None:
            raise StepFailed(f"pytest ran past {timeout:.0f} s (output so far in pytest_cuda.txt)")
        if rc == 5:
            raise Skip("pytest collected no test marked cuda")
        if rc != 0:
            raise StepFailed(f"pytest exited with status {rc}: {summary_line(output)}")
        if not self.tiny and cuda_device(self.device()) and not counts.get("passed"):
            raise StepFailed(f"no cuda test passed on a CUDA device: {summary_line(output)}")

    # 2 -------------------------------------------------------------------------------------------------
    def fashion(self, rec: dict[str, Any]) -> None:
        """The i-ResNet's Fashion-MNIST profile (full; smoke with --tiny) for --minutes."""
        self._fashion(rec, "iresnet")

    # 3 -------------------------------------------------------------------------------------------------
    def fashion_coupling(self, rec: dict[str, Any]) -> None:
        """The coupling flow's Fashion-MNIST profile, the same way."""
        self._fashion(rec, "coupling")

    def _fashion(self, rec: dict[str, Any], backbone: str) -> None:
        from mixflow_core.data import DEBIAN_FASHION_MNIST, load_data
        from mixflow_core.eval.metrics import evaluate
        from mixflow_core.flows.model import build_model
        from mixflow_core.training.config import apply_overrides
        from mixflow_core.training.fit import fit
        from mixflow_core.training.profiles import get_profile

        device = self.device()
        with tempfile.TemporaryDirectory(prefix="gpu_check_fashion_") as tmp:
            root: str | None = str(self.fashion_root())
            overrides: dict[str, Any] = {"runtime.device": self.args.device, "runtime.progress": False}
            if self.tiny:
                profile = "smoke"
                overrides["runtime.max_minutes"] = min(self.args.minutes, 1.0)
                if has_fashion(Path(root)):
                    rec["data"] = f"idx files in {root} (test set cut to 1000 images for the dry run)"
                    overrides["data.test_limit"] = 1000
                else:
                    root = str(write_fake_fashion(Path(tmp)))
                    rec["data"] = f"generated idx files (random images) in {root}"
            else:
                profile = "full"
                overrides["runtime.max_minutes"] = self.args.minutes
                if not has_fashion(Path(root)):
                    if not has_fashion(DEBIAN_FASHION_MNIST):
                        raise StepFailed(f"no Fashion-MNIST idx files in {root} (nor in {DEBIAN_FASHION_MNIST}): run "
                                         "`make gpu-data` before the device run, or pass --fashion-root")
                    root = None  # load_data's own default: the Debian package
                rec["data"] = f"idx files in {root or DEBIAN_FASHION_MNIST}"
            if root is not None:
                overrides["data.root"] = root
            cfg = apply_overrides(get_profile("fashion-mnist", profile, backbone), overrides)
            rec.update(profile=profile, backbone=backbone, model=str(cfg.model.arch),
                       logdet=type(cfg.model.logdet).__name__ if backbone == "iresnet" else "exact (coupling)",
                       batch_size=cfg.train.batch_size, max_minutes=cfg.runtime.max_minutes)
            t0 = time.perf_counter()
            data = load_data(cfg.data)
            rec.update(data_load_s=time.perf_counter() - t0, n_train=len(data.train), n_val=len(data.val),
                       n_test=len(data.test))
        torch.manual_seed(cfg.train.seed)
        model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior, data.class_counts())
        rec["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("fashion-mnist %s profile: %s, %d parameters, %d training images, %.1f min on %s", profile,
                 rec["model"], rec["params"], rec["n_train"], cfg.runtime.max_minutes, device)
        reset_peak(device)
        t0 = time.perf_counter()
        history = fit(model, data, cfg.train, cfg.runtime)
        rec["fit_wall_s"] = time.perf_counter() - t0
        batches_per_epoch = len(data.train) // cfg.train.batch_size  # fit drops the last partial batch
        images = sum(e.get("batches", batches_per_epoch) for e in history.epochs) * cfg.train.batch_size
        train_s = sum(e["epoch_seconds"] for e in history.epochs)  # the batches only, without validation
        rec.update(epochs=len(history.epochs), stopped=history.stopped, best_epoch=history.best_epoch,
                   skipped_batches=history.skipped_batches, images_trained=images, train_s=train_s,
                   img_per_s=images / train_s if train_s > 0 else None, peak_memory_train_gib=peak_gib(device),
                   history=[{k: e.get(k) for k in ("epoch", "train_loss", "val_bpd", "val_acc", "epoch_seconds",
                                                   "partial", "batches")} for e in history.epochs])
        self.save()
        log.info("trained %d epoch(s) (%s), %d images at %.1f img/s", rec["epochs"], rec["stopped"], images,
                 rec["img_per_s"] or float("nan"))
        torch.manual_seed(cfg.train.seed)  # dequantisation noise and probes of the evaluation
        t0 = time.perf_counter()
        m = evaluate(model, data.test, cfg.runtime.eval_batch_size, device, cfg.runtime.eval_draws)
        sync(device)
        eval_s = time.perf_counter() - t0
        rec.update(test_n=m["n"], test_accuracy=m["accuracy"], test_bpd=m["bpd_conditional"],
                   test_bpd_marginal=m["bpd_marginal"], test_ece=m["ece"], eval_draws=m["draws"], eval_s=eval_s,
                   eval_img_per_s=m["n"] / eval_s, peak_memory_gib=peak_gib(device))
        log.info("test (%d images): accuracy %.4f, %.4f bits/dim, evaluated in %.1f s", m["n"], m["accuracy"],
                 m["bpd_conditional"], eval_s)
        if not (math.isfinite(m["accuracy"]) and math.isfinite(m["bpd_conditional"])):
            raise StepFailed(f"non-finite test metrics: accuracy {m['accuracy']}, bits/dim {m['bpd_conditional']}")

    def fashion_root(self) -> Path:
        root = Path(self.args.fashion_root)
        return root if root.is_absolute() else ROOT / root

    # 4 -------------------------------------------------------------------------------------------------
    def cifar(self, rec: dict[str, Any]) -> None:
        from mixflow_core.data import load_data
        from mixflow_core.flows.model import build_model
        from mixflow_core.training.config import apply_overrides
        from mixflow_core.training.profiles import get_profile

        device = self.device()
        profile, batches = ("smoke", (4, 8)) if self.tiny else ("full", (64, 256))
        warmup, max_steps = (1, 2) if self.tiny else (2, 20)
        timed_s = 5.0 if self.tiny else 15.0  # per batch size, after the warm-up: as many steps as fit (>= 1)
        with tempfile.TemporaryDirectory(prefix="gpu_check_cifar_") as tmp:
            # 5 training files of max(batches) / 4 images: more than the largest batch after the validation split
            root = write_fake_cifar(Path(tmp), n_per_batch=max(20, math.ceil(max(batches) / 4)))
            overrides = {"data.root": str(root), "data.train_limit": None, "runtime.device": self.args.device}
            cfg = apply_overrides(get_profile("cifar10", profile, "iresnet"), overrides)
            data = load_data(cfg.data)
        rec.update(profile=profile, model=str(cfg.model.arch), logdet=type(cfg.model.logdet).__name__,
                   data="random uint8 3x32x32 images, 10 balanced classes, written as CIFAR-10 batches", rows=[])
        # one model for both batch sizes: building it runs 50 power iterations per convolution on the CPU (~45 s on one
        # thread at the full size, and fit left torch at runtime.threads = 1), so build it once, on every core
        threads = torch.get_num_threads()
        if not self.tiny:
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            t0 = time.perf_counter()
            torch.manual_seed(cfg.train.seed)
            model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior,
                                data.class_counts()).to(device)
            rec.update(build_s=time.perf_counter() - t0, build_threads=torch.get_num_threads(),
                       params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        finally:
            torch.set_num_threads(threads)
        log.info("cifar10 %s model %s: %d parameters, built in %.1f s", profile, rec["model"], rec["params"],
                 rec["build_s"])
        for b in batches:
            row: dict[str, Any] = {"batch": b}
            rec["rows"].append(row)
            try:
                row.update(train_step(model, cfg, data, b, device, warmup, max_steps, timed_s))
                log.info("cifar10 %s model, batch %d: %.1f img/s (%d timed steps), peak %s", profile, b,
                         row["img_per_s"], row["steps"],
                         "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB")
            except StepTimeout:
                row["error"] = "StepTimeout: the step's budget ran out during this batch size"
                raise
            except Exception as err:  # e.g. out of memory at the larger batch: the other batch size still counts
                row.update(error=f"{type(err).__name__}: {err}"[:2000], traceback=tail(traceback.format_exc(), 20))
                log.info("cifar10 batch %d failed: %s", b, row["error"].splitlines()[0])
            finally:
                reset_peak(device)
            self.save()
        failed = [r for r in rec["rows"] if "error" in r]
        if failed:
            raise StepFailed(f"batch size(s) {[r['batch'] for r in failed]} failed: {failed[0]['error'].splitlines()[0]}")

    # 5 -------------------------------------------------------------------------------------------------
    def precision(self, rec: dict[str, Any]) -> None:
        """runtime.precision measured before it may become a default: training img/s of the Fashion-MNIST `full` model
        (random images, batch 64) under fp32, tf32 and bf16, and after each one's steps the bound (every spectral layer's
        operator norm by an independent power iteration, after converge) and the inverse error; then the host syncs of
        one training step (CUDA's sync debug mode)."""
        from mixflow_core.data import load_data
        from mixflow_core.flows.layers import PRECISIONS, training_precision
        from mixflow_core.flows.iresnet.lipschitz import converge_spectral_norms, operator_norm, spectral_layers
        from mixflow_core.flows.model import build_model
        from mixflow_core.training.config import apply_overrides
        from mixflow_core.training.fit import inverse_error
        from mixflow_core.training.profiles import get_profile

        device = self.device()
        profile, batch = ("smoke", 8) if self.tiny else ("full", 64)
        warmup, max_steps, timed_s = (1, 2, 3.0) if self.tiny else (2, 30, 10.0)
        with tempfile.TemporaryDirectory(prefix="gpu_check_precision_") as tmp:
            root = write_fake_fashion(Path(tmp), n_train=max(240, 2 * batch), n_test=20)
            cfg = apply_overrides(get_profile("fashion-mnist", profile, "iresnet"),
                                  {"data.root": str(root), "data.train_limit": None, "runtime.device": self.args.device})
            data = load_data(cfg.data)
        torch.manual_seed(cfg.train.seed)
        model = build_model(data.data_shape, data.num_classes, data.levels, cfg.model, cfg.prior,
                            data.class_counts()).to(device)
        rec.update(profile=profile, model=str(cfg.model.arch), batch=batch, coeff=cfg.model.coeff, rows=[])
        x = data.train.tensors[0][:16].to(device)
        for precision in PRECISIONS:
            row: dict[str, Any] = {"precision": precision}
            rec["rows"].append(row)
            with training_precision(model.flow, precision):
                row.update(train_step(model, cfg, data, batch, device, warmup, max_steps, timed_s))
            converge_spectral_norms(model)  # what fit does before it saves or evaluates
            model.eval()
            row["max_operator_norm"] = max(operator_norm(layer, n_iterations=200) for layer in spectral_layers(model))
            row["inverse_error"] = inverse_error(model, x)
            log.info("precision %s: %.1f img/s, max operator norm %.5f (coeff %.2f), inverse error %.2e", precision,
                     row["img_per_s"], row["max_operator_norm"], cfg.model.coeff, row["inverse_error"])
            self.save()
        if cuda_device(device):  # the host syncs of one training step, as CUDA reports them
            import warnings

            model.train()
            xb, yb = data.train.tensors[0][:batch].to(device), data.train.tensors[1][:batch].to(device)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    cfg.train.objective(model(xb), yb, model.prior.log_class_probs, model.dim).backward()
                    sync(device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
            rec.update(syncs_per_step=len(syncs), sync_messages=sorted(set(syncs))[:10])
        broken = [r["precision"] for r in rec["rows"] if r["max_operator_norm"] > cfg.model.coeff + 1e-3]
        if broken:
            raise StepFailed(f"the Lipschitz bound broke after training steps at {broken}")

    # 6 -------------------------------------------------------------------------------------------------
    def report(self, rec: dict[str, Any]) -> None:
        # GPU_CHECK_REPORT_MODULES (comma-separated) replaces the list: tests/test_gpu_check.py names a missing module
        # there, so that the dry run takes the device machine's path and stays short
        needed = [m for m in os.environ.get("GPU_CHECK_REPORT_MODULES", ",".join(REPORT_MODULES)).split(",") if m]
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"{REPORT_MISSING} (missing: {', '.join(missing)})")
        where = self.out / "report"
        cmd = [sys.executable, "-m", "mixflow_core", "report", "--profile", "smoke", "--device", self.args.device,
               "--baselines", "fast", "--quiet", "--reports-dir", str(where / "reports"),
               "--figures-dir", str(where / "figures"), "--runs-dir", str(where / "runs")]
        timeout = self.budget("report") - 10
        rec["command"] = " ".join(["python", *cmd[1:]])
        rc, output = run_command(cmd, timeout, self.out / "report.txt")
        rec.update(returncode=rc, output_tail=tail(output), results_md=str(where / "figures" / "results.md"))
        log.info("%s", tail(output, 15))
        if rc is None:
            raise StepFailed(f"the report ran past {timeout:.0f} s (output so far in report.txt)")
        if rc != 0:
            raise StepFailed(f"the report exited with status {rc}: {tail(output, 1)}")
        done = re.search(r"report finished in ([\d.]+) min", output)
        rec["report_minutes"] = float(done.group(1)) if done else None


def train_step(model, cfg, data, batch: int, device: torch.device, warmup: int, max_steps: int,
               timed_s: float) -> dict[str, Any]:
    """Training images/s of `model` (on `device`) at `batch`: forward, backward, clip, Adam; and the peak memory.

    The steps are fit's (objective, grad_clip, a fresh Adam at train.lr) on one fixed batch; the model's first
    warm-up step is also ActNorm's data-dependent initialisation. The first timed step, between two
    synchronizations, sets how many more fit into `timed_s` (at most max_steps in all); the clock stops after a
    final synchronize. The peak counts from here: weights, this Adam's state, activations.
    """
    model.zero_grad(set_to_none=True)  # no gradients left from the previous batch size
    reset_peak(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x, y = data.train.tensors[0][:batch].to(device), data.train.tensors[1][:batch].to(device)
    if len(x) < batch:
        raise ValueError(f"only {len(x)} synthetic training images for batch {batch}")

    def step() -> torch.Tensor:
        loss = cfg.train.objective(model(x), y, model.prior.log_class_probs, model.dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first = time.perf_counter() - t0
    steps = max(1, min(max_steps, int(timed_s / max(first, 1e-9))))
    for _ in range(steps - 1):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"img_per_s": steps * batch / seconds, "step_s": seconds / steps, "steps": steps, "warmup": warmup,
            "warmup_s": warmup_s, "loss": float(loss), "peak_memory_gib": peak_gib(device)}


def pytest_counts(output: str) -> dict[str, int]:
    """{passed, failed, skipped, deselected, errors, ...} from pytest's final summary line."""
    line = summary_line(output)
    counts: dict[str, int] = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)", line):
        counts[{"error": "errors", "warning": "warnings"}.get(what, what)] = int(n)
    return counts


def summary_line(output: str) -> str:
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) or "no tests ran" in line:
            return line.strip("= ")
    return tail(output, 1)


def headline(name: str, rec: dict[str, Any]) -> str:
    """One line per step for the summary table."""
    if rec.get("status") in ("failed", "skipped"):
        return (rec.get("reason") or "").splitlines()[0][:160] if rec.get("reason") else ""
    if rec.get("status") != "ok":
        return ""
    if name == "environment":
        mem = f", {rec['memory_gib']:.0f} GiB" if rec.get("memory_gib") else ""
        return f"torch {rec['torch']}, CUDA {rec['cuda_build']}, {rec.get('device_name')}{mem}"
    if name == "pytest":
        return ", ".join(f"{n} {k}" for k, n in rec["counts"].items()) or "no summary"
    if name in ("fashion", "fashion_coupling"):
        peak = f", peak {rec['peak_memory_gib']:.2f} GiB" if rec.get("peak_memory_gib") is not None else ""
        return (f"{rec['img_per_s']:.1f} img/s train; test acc {rec['test_accuracy']:.4f}, {rec['test_bpd']:.4f} "
                f"bits/dim (n={rec['test_n']}, eval {rec['eval_s']:.1f} s){peak}")
    if name == "cifar":
        return "; ".join(f"batch {r['batch']}: {r['img_per_s']:.1f} img/s"
                         + (f" ({r['peak_memory_gib']:.2f} GiB)" if r.get("peak_memory_gib") is not None else "")
                         for r in rec["rows"])
    if name == "precision":
        syncs = f"; {rec['syncs_per_step']} syncs/step" if rec.get("syncs_per_step") is not None else ""
        return "; ".join(f"{r['precision']} {r['img_per_s']:.1f} img/s, norm {r['max_operator_norm']:.4f}"
                         for r in rec["rows"]) + syncs
    if name == "report":
        return f"finished in {rec.get('report_minutes')} min: {rec['results_md']}"
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="steps: " + ", ".join(f"{i} {s}" for i, s in enumerate(STEPS)))
    ap.add_argument("--out", required=True, help="output directory (gpu_check.json, gpu_check.log, ...)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--minutes", type=float, default=2.0, help="Fashion-MNIST training minutes (default 2)")
    ap.add_argument("--fashion-root", default="data/fashion-mnist",
                    help="directory with the Fashion-MNIST idx files (default data/fashion-mnist, from `make gpu-data`)")
    ap.add_argument("--cuda-tests", default=str(CUDA_TESTS.relative_to(ROOT)),
                    help="test file run with -m cuda (default tests/test_cuda.py; if absent, -m cuda over tests/)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: smoke sizes, a few steps, generated data "
                    "where the real files are absent")
    ap.add_argument("--skip", nargs="+", action="extend", default=[], metavar="STEP",
                    type=lambda s: STEPS[int(s)] if s.isdigit() and int(s) < len(STEPS) else s,
                    help=f"steps not to run, by name or number: {', '.join(STEPS)}")
    args = ap.parse_args(argv)
    unknown = [s for s in args.skip if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown} for --skip; steps are {', '.join(STEPS)}")
    if args.minutes <= 0:
        ap.error("--minutes must be positive")
    return args


def _setup_logging(out: Path) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout), logging.FileHandler(out / "gpu_check.log")]
    for h in handlers:
        h.setFormatter(fmt)
    for name in ("gpu_check", "mixflow_core"):  # fit logs every epoch at INFO
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        lg.propagate = False
        for h in handlers:
            lg.addHandler(h)
    return handlers


def main(argv: list[str] | None = None) -> int:
    """Run every step; 0 when none failed, 1 otherwise (skipped steps are not failures)."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(out)
    try:
        log.info("%s", header(torch.get_num_threads()))
        log.info("gpu check%s on %s -> %s", " (tiny dry run)" if args.tiny else "", args.device, out / "gpu_check.json")
        check = Check(args)
        check.save()
        for name in STEPS:
            check.run(name, getattr(check, name))
        check.record["finished"] = True
        check.save()
        steps = check.record["steps"]
        rows = [{"step": f"{i} {n}", "status": steps[n]["status"], "seconds": f"{steps[n].get('seconds', 0.0):.1f}",
                 "result": headline(n, steps[n])} for i, n in enumerate(STEPS)]
        log.info("\n%s\n\ntotal %.1f s; wrote %s and %s", table(rows), check.record["total_seconds"], check.path,
                 out / "gpu_check.log")
        return 1 if any(s["status"] == "failed" for s in steps.values()) else 0
    finally:
        for name in ("gpu_check", "mixflow_core"):
            for h in handlers:
                logging.getLogger(name).removeHandler(h)
        for h in handlers:
            h.close()


if __name__ == "__main__":
    sys.exit(main())
