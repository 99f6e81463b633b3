"""A real browser drives the notebooks' widgets in JupyterLab: run all, then use each widget.

JupyterLab runs from this Python's environment, offline (no news, update check or extension
manager), on a free port with an empty token, serving a tmp folder that holds copies of the
notebooks whose parameters cells point at smoke runs. Debian's chromium (never `playwright install`)
is driven by playwright, one page and JupyterLab workspace per notebook: Run > Run All Cells, then

- notebooks/03_sampling.ipynb (one digits smoke run): the class dropdown and the temperature slider
  must each change the sampler's image;
- notebooks/02_overlap_diagnosis.ipynb (student and fixed digits smoke runs, 3 epochs, snapshots
  after epochs 1 and 2; 150 test points, no t-SNE): the overlap explorer's "snapshot" slider must
  change the ellipse panels, and the "image" dropdown, a typed "index" and the "weights" dropdown
  the classify-one-image view, each control leaving the other image alone.

Without chromium or playwright the tests are skipped, except under CI (environment variable CI set),
where they fail.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mixflow_core import study
from mixflow_core.cli import main
from mixflow_core.training import runs
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
# Budgets (s) of each test's browser steps (its training and the server start come before them). Passing runs
# take ~30 s for the sampler (training and server start included) and ~40 s for the explorer (its trainings included).
SERVER_START_S = 30
SAMPLER_BUDGET_S = 75
EXPLORER_BUDGET_S = 90
EXPLORER_POINTS = 150  # notebook 02's max_points: the test images the explorer draws and classifies
# Requests to the local server must not go through an http(s)_proxy from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    """playwright's entry point, once chromium and the notebook stack are known to be there."""
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    missing = [m for m in ("playwright", "jupyterlab", "ipywidgets", "ipykernel", "nbformat")
               if importlib.util.find_spec(m) is None]
    if missing:
        _missing(f"{', '.join(missing)} not installed (pip install {' '.join(missing)}; "
                 "the browser is Debian's chromium, never `playwright install`)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture(scope="module")
def lab_dir(sync_playwright, tmp_path_factory) -> Path:
    """The folder JupyterLab serves: the notebook fixtures put their runs and notebook copies in it."""
    return tmp_path_factory.mktemp("lab")


def _copy_notebook(name: str, lab_dir: Path, parameters: list[str]) -> Path:
    """notebooks/<name> copied into lab_dir with its `parameters` cell replaced by these lines; the copy's path."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = "\n".join(parameters)
    nbformat.write(nb, lab_dir / name)
    return lab_dir / name


@pytest.fixture(scope="module")
def sampling_notebook(lab_dir) -> Path:
    """A smoke run and a copy of notebook 03 whose parameters point at it (results in <stem>.json)."""
    run_dir = lab_dir / "sampling_run"
    assert main(["train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(run_dir)]) == 0
    return _copy_notebook("03_sampling.ipynb", lab_dir, [
        f"run_dir = {str(run_dir)!r}",
        f"figures_dir = {str(lab_dir / 'figures_03')!r}",
        f"results_json = {str(lab_dir / '03_sampling.json')!r}",
        'device = "cpu"', "temperature = 0.7", "n_samples = 8", "seed = 0", "interpolate = [0, 1]", "steps = 10",
    ])


@pytest.fixture(scope="module")
def overlap_notebook(lab_dir) -> Path:
    """Student and fixed smoke runs (3 epochs, snapshots after epochs 1 and 2) and a copy of notebook 02 on them."""
    run_dirs = {config: lab_dir / f"overlap_{config}" for config in ("student", "fixed")}
    for config, run_dir in run_dirs.items():
        cfg = study.run_config("digits", "smoke", config, progress=False, overrides={"runtime.epochs": 3})
        runs.ensure_run(cfg, run_dir, "smoke", (1, 2))
    return _copy_notebook("02_overlap_diagnosis.ipynb", lab_dir, [
        f"fixed_run = {str(run_dirs['fixed'])!r}",
        f"student_run = {str(run_dirs['student'])!r}",
        f"figures_dir = {str(lab_dir / 'figures_02')!r}",
        f"results_json = {str(lab_dir / '02_overlap_diagnosis.json')!r}",
        'ablation_json = ""', 'device = "cpu"', f"max_points = {EXPLORER_POINTS}", "tsne = False", "seed = 0",
    ])


@pytest.fixture(scope="module")
def lab_server(lab_dir, tmp_path_factory):
    """JupyterLab on 127.0.0.1:<free port>, offline and quiet; yields its base URL, stops it afterwards."""
    home = tmp_path_factory.mktemp("jupyter")
    # The announcements plugin would toast "receive official Jupyter news?" over the page.
    (home / "config" / "labconfig").mkdir(parents=True)
    (home / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    ))
    env = {
        **os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={lab_dir}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--ServerApp.log_level=WARN"],
        cwd=lab_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{(home / 'server.log').read_text()}")
            try:
                with _LOCAL.open(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_S} s:\n{(home / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


class Deadline:
    """One time budget for a sequence of waits: each wait gets what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the browser test ran past its {self.seconds:.0f} s budget")
        return left

    def ms(self) -> float:
        return 1000 * self.left()


@pytest.fixture
def page(sync_playwright, lab_server, tmp_path):
    """A chromium page; a screenshot of its last state is left in tmp_path/last.png for debugging."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            try:
                yield page
            finally:
                try:
                    page.screenshot(path=str(tmp_path / "last.png"), timeout=5_000)
                except Exception:  # only a debugging aid
                    pass
        finally:
            browser.close()


def _image_bytes(page, src: str) -> bytes:
    """The bytes behind the widget's <img src="blob:...">, fetched inside the page."""
    b64 = page.evaluate(
        """async (src) => {
            const buf = new Uint8Array(await (await fetch(src)).arrayBuffer());
            let s = ""; for (const b of buf) s += String.fromCharCode(b);
            return btoa(s);
        }""",
        src,
    )
    return base64.b64decode(b64)


def _shown_image(page, image, deadline: Deadline, old_src: str | None = None) -> tuple[str, bytes]:
    """(src, PNG bytes) of the widget image once it is loaded and, given old_src, replaced."""
    page.wait_for_function(
        "([el, old]) => el.getAttribute('src') && el.getAttribute('src') !== old && el.complete && el.naturalWidth > 0",
        arg=[image.element_handle(timeout=deadline.ms()), old_src], timeout=deadline.ms(),
    )
    src = image.get_attribute("src", timeout=deadline.ms())
    png = _image_bytes(page, src)
    assert png.startswith(b"\x89PNG"), "the widget image is not a PNG"
    return src, png


def _wait_for_kernel(page, url: str, name: str, deadline: Deadline) -> None:
    """Until the server has an idle kernel for notebook `name` and the page shows it idle.

    Run All before the page has attached the kernel would open a "Select Kernel" dialog instead.
    """
    while True:
        with _LOCAL.open(f"{url}/api/sessions", timeout=5) as r:
            sessions = json.load(r)
        if any(s["path"].endswith(name) and (s.get("kernel") or {}).get("execution_state") == "idle"
               for s in sessions):
            break
        if deadline.left() < 1:
            raise TimeoutError(f"no idle kernel for {name}: sessions {sessions}")
        time.sleep(0.5)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=deadline.ms())
    page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=deadline.ms())


def _run_all(page, deadline: Deadline) -> None:
    """Run > Run All Cells, through the menu bar."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=deadline.ms())
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click(timeout=deadline.ms())


def _open_and_run_all(page, url: str, notebook: Path, deadline: Deadline) -> None:
    """Open the notebook copy in a workspace of its own (no tabs restored from another test), Run All, and wait
    until a widget image is shown."""
    name = notebook.name
    page.goto(f"{url}/lab/workspaces/{notebook.stem}/tree/{name}", timeout=deadline.ms())
    _wait_for_kernel(page, url, name, deadline)
    _run_all(page, deadline)
    image, dialog = page.locator(".widget-image"), page.locator(".jp-Dialog")
    image.or_(dialog).first.wait_for(state="visible", timeout=deadline.ms())
    if dialog.count():  # "Select Kernel": the page was still attaching the kernel after all; accept, run again
        dialog.locator(".jp-mod-accept").click(timeout=deadline.ms())
        _wait_for_kernel(page, url, name, deadline)
        _run_all(page, deadline)
        image.first.wait_for(state="visible", timeout=deadline.ms())


def _src(image, deadline: Deadline) -> str:
    """The image's current src (a blob: URL, new for every value the kernel sends)."""
    return image.get_attribute("src", timeout=deadline.ms())


def _results(notebook: Path) -> dict:
    """The notebook's results JSON. The widget's comm messages queue behind Run All's cells, so once a widget has
    answered a change, every cell has run and the file is written."""
    return json.loads(notebook.with_suffix(".json").read_text())


def test_widget_in_jupyterlab(page, lab_server, sampling_notebook):
    """Run All renders the sampler; the class dropdown and the temperature slider each re-render its image."""
    deadline = Deadline(SAMPLER_BUDGET_S)
    _open_and_run_all(page, lab_server, sampling_notebook, deadline)

    image = page.locator(".widget-image")
    status = page.locator(".widget-label", has_text="\u00b7 seed")  # the SamplerWidget's status line
    src0, png0 = _shown_image(page, image, deadline)
    status.filter(has_text="class 0 \u00b7 T=0.70 \u00b7 8 samples \u00b7 seed 0").wait_for(timeout=deadline.ms())

    page.locator(".widget-dropdown select").select_option(label="3", timeout=deadline.ms())
    src1, png1 = _shown_image(page, image, deadline, src0)
    assert png1 != png0, "choosing class 3 did not change the picture"
    status.filter(has_text="class 3 \u00b7 T=0.70").wait_for(timeout=deadline.ms())

    handle = page.locator(".widget-hslider", has_text="temperature").locator(".noUi-handle")
    handle.focus(timeout=deadline.ms())
    for _ in range(4):  # 4 steps of 0.05
        handle.press("ArrowRight", timeout=deadline.ms())
    status.filter(has_text="class 3 \u00b7 T=0.90 \u00b7 8 samples").wait_for(timeout=deadline.ms())
    _, png2 = _shown_image(page, image, deadline, src1)
    assert png2 not in (png0, png1), "raising the temperature did not change the picture"

    results = _results(sampling_notebook)
    assert len(results["figures"]) == 2 and all(Path(p).is_file() for p in results["figures"])


def test_overlap_explorer_in_jupyterlab(page, lab_server, overlap_notebook):
    """Run All renders the overlap explorer; its snapshot slider re-renders the ellipse panels, and its image pick,
    typed index and weights each re-render the classify-one-image view, each leaving the other image as it was."""
    deadline = Deadline(EXPLORER_BUDGET_S)
    _open_and_run_all(page, lab_server, overlap_notebook, deadline)

    images = page.locator(".widget-image")
    epochs, view = images.nth(0), images.nth(1)  # the VBox's order: slider, ellipse panels, ..., classify view
    epoch_status = page.locator(".widget-label", has_text="student: ")  # "student: <label> | fixed: <label>"
    image_status = page.locator(".widget-label", has_text=" \u00b7 image ")  # "<weights> · image <i> (<pick>) · ..."
    pick = page.locator(".widget-dropdown", has_text="image").locator("select")
    weights = page.locator(".widget-dropdown", has_text="weights").locator("select")
    index = page.locator(".widget-text", has_text="index").locator("input")

    e0, epng0 = _shown_image(page, epochs, deadline)
    v0, vpng0 = _shown_image(page, view, deadline)
    epoch_status.filter(has_text="student: best").filter(has_text="fixed: best").wait_for(timeout=deadline.ms())
    image_status.filter(has_text="fixed \u00b7 image").filter(has_text="(most confused)").wait_for(timeout=deadline.ms())
    assert images.count() == 2 and weights.input_value(timeout=deadline.ms()) == "fixed"
    i0 = int(index.input_value(timeout=deadline.ms()))

    # (1) the snapshot slider, from the best weights (last) to the first snapshot: the ellipse panels only
    handle = page.locator(".widget-hslider", has_text="snapshot").locator(".noUi-handle")
    handle.focus(timeout=deadline.ms())
    handle.press("Home", timeout=deadline.ms())
    epoch_status.filter(has_text="student: epoch 1 | fixed: epoch 1").wait_for(timeout=deadline.ms())
    e1, epng1 = _shown_image(page, epochs, deadline, e0)
    assert epng1 != epng0, "moving the snapshot slider to epoch 1 did not change the ellipse panels"
    assert _src(view, deadline) == v0, "the snapshot slider re-rendered the classify view"

    # (2a) the image dropdown: "most OOD" picks the test image of lowest p(x) and shows its index
    pick.select_option(label="most OOD", timeout=deadline.ms())
    ood = image_status.filter(has_text="(most OOD)")
    ood.wait_for(timeout=deadline.ms())
    i1 = int(re.search(r"image (\d+) \(most OOD\)", ood.inner_text(timeout=deadline.ms())).group(1))
    assert index.input_value(timeout=deadline.ms()) == str(i1), "the index box does not show the picked image"
    if i1 != i0:  # a different image; the most confused one may also be the most OOD, then the view stays as it is
        v1, vpng1 = _shown_image(page, view, deadline, v0)
        assert vpng1 != vpng0, f"picking the most OOD image ({i1}) did not change the classify view"
    else:
        v1, vpng1 = v0, vpng0

    # (2b) a typed index: classify that image, the pick switches to "index"
    i2 = (i1 + 1) % EXPLORER_POINTS
    index.fill(str(i2), timeout=deadline.ms())
    index.press("Enter", timeout=deadline.ms())
    image_status.filter(has_text=f"fixed \u00b7 image {i2} (index)").wait_for(timeout=deadline.ms())
    v2, vpng2 = _shown_image(page, view, deadline, v1)
    assert vpng2 not in (vpng0, vpng1), f"typing index {i2} did not change the classify view"
    assert pick.input_value(timeout=deadline.ms()) == "index", "a typed index did not switch the pick to index"

    # (3) the weights dropdown: the same image under the student's weights
    weights.select_option(label="student", timeout=deadline.ms())
    image_status.filter(has_text=f"student \u00b7 image {i2} (index)").wait_for(timeout=deadline.ms())
    _, vpng3 = _shown_image(page, view, deadline, v2)
    assert vpng3 not in (vpng0, vpng1, vpng2), "switching the weights to student did not change the classify view"
    assert _src(epochs, deadline) == e1, "the classify controls re-rendered the ellipse panels"

    results = _results(overlap_notebook)  # save_static: first and last snapshot, both picks per configuration
    assert len(results["explorer_figures"]) == 6 and all(Path(p).is_file() for p in results["figures"])
    assert {Path(p).name for p in results["figures"]} >= set(results["explorer_figures"])
