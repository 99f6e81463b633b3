"""A real browser drives notebooks/03_sampling.ipynb in JupyterLab: run all, then use the widget.

JupyterLab runs from this Python's environment, offline (no news, update check or extension
manager), on a free port with an empty token, serving a tmp folder that holds a copy of the
notebook pointed at a smoke run. Debian's chromium (never `playwright install`) is driven by
playwright: Run > Run All Cells, then the class dropdown and the temperature slider must each
change the sampler's image. Without chromium or playwright the test is skipped, except under
CI (environment variable CI set), where it fails.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mixflow_core.cli import main
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "03_sampling.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
# Budgets (s): training + server start + the browser steps stay under two minutes; a passing run takes ~25 s.
SERVER_START_S = 30
TEST_BUDGET_S = 75
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
    """A folder with a smoke run and a copy of notebook 03 whose parameters point at it."""
    import nbformat

    root = tmp_path_factory.mktemp("lab")
    run_dir = root / "run"
    assert main(["train", "--dataset", "digits", "--profile", "smoke", "--run-dir", str(run_dir)]) == 0
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = "\n".join([
        f"run_dir = {str(run_dir)!r}",
        f"figures_dir = {str(root / 'figures')!r}",
        f"results_json = {str(root / 'results.json')!r}",
        'device = "cpu"', "temperature = 0.7", "n_samples = 8", "seed = 0", "interpolate = [0, 1]", "steps = 10",
    ])
    nbformat.write(nb, root / "03_sampling.ipynb")
    return root


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


def test_widget_in_jupyterlab(page, lab_server, lab_dir):
    """Run All renders the sampler; the class dropdown and the temperature slider each re-render its image."""
    deadline = Deadline(TEST_BUDGET_S)
    page.goto(f"{lab_server}/lab/tree/03_sampling.ipynb", timeout=deadline.ms())
    _wait_for_kernel(page, lab_server, "03_sampling.ipynb", deadline)
    _run_all(page, deadline)

    image, dialog = page.locator(".widget-image"), page.locator(".jp-Dialog")
    image.or_(dialog).first.wait_for(state="visible", timeout=deadline.ms())
    if dialog.count():  # "Select Kernel": the page was still attaching the kernel after all; accept, run again
        dialog.locator(".jp-mod-accept").click(timeout=deadline.ms())
        _wait_for_kernel(page, lab_server, "03_sampling.ipynb", deadline)
        _run_all(page, deadline)
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

    # The widget's comm messages queue behind Run All's cells, so those have run: figures and results exist.
    results = json.loads((lab_dir / "results.json").read_text())
    assert len(results["figures"]) == 2 and all(Path(p).is_file() for p in results["figures"])
