"""The report as browsable HTML: each executed notebook exported with its figures inline, and an index linking them.

Unit tests build tiny notebooks by hand (no papermill); the smoke report (tests/conftest.py, once per session) checks
the pages of a real run, and Debian's chromium, driven by playwright as in test_browser.py (never
`playwright install`; skipped without chromium or playwright, except under CI), follows the index to 02 offline.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import struct
import zlib
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from mixflow_core.study import html_report, report
from tests.study.test_browser import CHROMIUM, CHROMIUM_ARGS, _missing


def _png(rows: list[bytes], width: int) -> bytes:
    """An 8-bit RGB PNG of these raw rows (3 bytes a pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))  # filter type 0 per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG = base64.b64encode(_png([b"\xff\x00\x00\x00\x00\xff"], 2)).decode()  # 2x1: red, blue
# an inline PNG image: nbconvert 7 writes <img alt="..." class="" src="data:image/png;base64,...">
INLINE_PNG = re.compile(r'<img\s[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class _Links(HTMLParser):
    """Every href and every <script src> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "script" and attrs.get("src") is not None:
            self.scripts.append(attrs["src"])


def _links(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _executed(path: Path, failed: bool = False, widgets: bool = False, duration: float = 1.5) -> Path:
    """A hand-made 'executed' notebook: markdown, a figure (image/png), text; papermill's metadata as it writes it."""
    cells = [new_markdown_cell("# A tiny notebook\nTemperature $T$ scales the prior."),
             new_code_cell("show()", execution_count=1, outputs=[
                 new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"}),
                 new_output("stream", name="stdout", text="accuracy 0.99\n")])]
    if widgets:
        view = {"model_id": "m1", "version_major": 2, "version_minor": 0}
        cells.append(new_code_cell("w", execution_count=2, outputs=[new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": view, "text/plain": "IntSlider(value=3)"})]))
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    nb.metadata["papermill"] = {"duration": duration, "exception": True if failed else None}
    for cell in nb.cells:
        cell.metadata["papermill"] = {"status": "completed"}
    if widgets:
        nb.metadata["widgets"] = {WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": {"m1": {
            "model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls",
            "model_module_version": "2.0.0", "state": {"value": 3}}}}}
    nbformat.write(nb, path)
    return path


def _steps(folder: Path) -> list[report.Step]:
    """Three steps of a report into `folder`, with the parameters plan() gives the first."""
    return [report.Step("01_train.ipynb", folder / "01_train_fixed.ipynb",
                        {"dataset": "digits", "profile": "smoke", "seed": 0, "device": "cpu", "overrides": {}},
                        "train the fixed configuration"),
            report.Step("02_overlap_diagnosis.ipynb", folder / "02_overlap_diagnosis.ipynb", {}, "diagnose <overlap>"),
            report.Step("03_sampling.ipynb", folder / "03_sampling.ipynb", {}, "sample per class")]


# -- export_html and the index, on hand-made notebooks -------------------------------------------------------------
def test_export_writes_figures_inline_and_no_remote_script(tmp_path):
    page = html_report.export_html(_executed(tmp_path / "a.ipynb"))
    assert page == tmp_path / "a.html"
    text = page.read_text(encoding="utf-8")
    assert INLINE_PNG.findall(text) == [PNG]  # the figure itself, not a link to a file
    assert "accuracy 0.99" in text and "A tiny notebook" in text and "$T$" in text  # LaTeX stays as source offline
    assert _links(page).scripts == [], "the offline page loads a script"
    assert "cdnjs" not in text and "unpkg" not in text


def test_the_lab_template_as_is_loads_cdn_scripts(tmp_path):
    """offline=False keeps nbconvert's lab template: require.js and MathJax from cdnjs, what offline=True leaves out."""
    page = html_report.export_html(_executed(tmp_path / "a.ipynb"), tmp_path / "lab.html", offline=False)
    scripts = _links(page).scripts
    assert any("require" in s and s.startswith("https://") for s in scripts)
    assert any("mathjax" in s.lower() for s in scripts)
    assert INLINE_PNG.findall(page.read_text(encoding="utf-8")) == [PNG]  # figures are inline either way


def test_saved_widget_state_stays_where_nbconvert_keeps_it(tmp_path):
    text = html_report.export_html(_executed(tmp_path / "w.ipynb", widgets=True)).read_text(encoding="utf-8")
    state = re.search(rf'<script type="{re.escape(WIDGET_STATE)}">(.*?)</script>', text, flags=re.S)
    assert state and "IntSliderModel" in state.group(1)
    assert 'type="application/vnd.jupyter.widget-view+json"' in text and "interactive widget" in text
    plain = html_report.export_html(_executed(tmp_path / "p.ipynb")).read_text(encoding="utf-8")
    assert WIDGET_STATE not in plain and "interactive widget" not in plain  # no widget, no state, no note


def test_status_reads_what_papermill_recorded(tmp_path):
    done, failed = _executed(tmp_path / "done.ipynb"), _executed(tmp_path / "failed.ipynb", failed=True)
    assert html_report.notebook_status(done) == "missing"  # not exported (yet)
    for nb in (done, failed):
        html_report.export_html(nb)
    assert html_report.notebook_status(done) == "done" and html_report.notebook_status(failed) == "failed"
    nb = nbformat.read(done, as_version=4)
    nb.cells[-1].metadata["papermill"]["status"] = "pending"  # a run killed before this cell
    nbformat.write(nb, done)
    assert html_report.notebook_status(done) == "incomplete"
    assert html_report.notebook_status(tmp_path / "never.ipynb") == "missing"


def test_index_links_what_exists_in_order_and_marks_the_rest(tmp_path):
    steps = _steps(tmp_path)
    html_report.export_html(_executed(steps[0].output, duration=12.3))
    html_report.export_html(_executed(steps[2].output, failed=True))
    _executed(steps[1].output)  # executed but never exported: a stale copy, not this report's
    table = tmp_path / "figures" / "results.md"
    table.parent.mkdir()
    table.write_text("| method | test accuracy |\n|---|---|\n| mixture flow: fixed | 0.9861 |\n")
    index = html_report.write_index(steps, table, now=datetime(2026, 12, 6, 23, 0, tzinfo=timezone.utc))
    assert index == tmp_path / "index.html" == html_report.index_path(steps)
    text = index.read_text(encoding="utf-8")
    assert _links(index).hrefs == ["01_train_fixed.html", "01_train_fixed.ipynb",
                                   "03_sampling.html", "03_sampling.ipynb"]
    assert _links(index).scripts == [] and "<script" not in text
    items = re.findall(r"<li>(.*?)</li>", text, flags=re.S)
    assert len(items) == 3
    assert "train the fixed configuration" in items[0] and "12 s" in items[0] and "status" not in items[0]
    assert "missing" in items[1] and "diagnose &lt;overlap&gt;" in items[1] and "href" not in items[1]
    assert 'class="failed status">failed' in items[2]
    assert "digits, smoke profile" in text and "seed 0" in text and "2026-12-06 23:00 UTC" in text
    assert "<table>" in text and "<td>mixture flow: fixed</td>" in text and "figures/results.md" in text
    assert "anchor-link" not in text
    assert "<table>" not in html_report.write_index(steps).read_text(encoding="utf-8")  # no table given: none shown


# -- the smoke report ------------------------------------------------------------------------------------------------
def test_report_exports_every_notebook_with_its_figures_inline(smoke_report):
    steps, summary, _, _ = smoke_report
    pages = [Path(s["html"]) for s in summary["steps"]]
    assert pages == [html_report.html_path(s.output) for s in steps] and all(p.is_file() for p in pages)
    overlap = next(p for p in pages if p.name == "02_overlap_diagnosis.html").read_text(encoding="utf-8")
    figures = INLINE_PNG.findall(overlap)
    assert len(figures) > 0 and all(base64.b64decode(f)[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    for page in pages:
        assert _links(page).scripts == [], f"{page.name} loads a script"
    executed = nbformat.read(steps[3].output, as_version=4)
    assert (WIDGET_STATE in overlap) == ("widgets" in executed.metadata)  # nbclient's saved state, kept as it was
    assert summary["html_seconds"] < 60  # a few seconds for six small notebooks; generous for a loaded machine


def test_report_index_links_resolve_relative_to_the_folder(smoke_report):
    steps, summary, _, tmp = smoke_report
    index = Path(summary["index_html"])
    assert index == tmp / "reports" / "index.html" and index.is_file()
    hrefs = _links(index).hrefs
    pages = [h for h in hrefs if h.endswith(".html")]
    assert pages == [html_report.html_path(s.output).name for s in steps]  # every notebook, in the plan's order
    text = index.read_text(encoding="utf-8")
    for href in hrefs:
        parsed = urlparse(href)
        assert not parsed.scheme and not parsed.netloc and not href.startswith("/"), f"not relative: {href}"
        if parsed.path:
            assert (index.parent / unquote(parsed.path)).is_file(), f"{href} does not resolve"
        else:  # a link within the page
            assert f'id="{unquote(parsed.fragment)}"' in text, f"{href} names no element of the page"
    assert 'class="missing' not in text and "digits, smoke profile" in text
    for step in steps:
        assert step.title in text
    assert "<table>" in text and "mixture flow: fixed" in text  # 04's results table


# -- a real browser, offline ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sync_playwright():
    """playwright's entry point, once chromium is known to be there (the skip rule of test_browser.py)."""
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        _missing("playwright not installed (pip install playwright; the browser is Debian's chromium, "
                 "never `playwright install`)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def test_index_to_overlap_page_in_chromium(sync_playwright, smoke_report, tmp_path):
    """index.html over file://, click 02's link: its figures decode, and no page asks for anything off the disk."""
    index = Path(smoke_report[1]["index_html"])
    remote: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(index.as_uri(), timeout=30_000)
            page.locator("a.page", has_text="02_overlap_diagnosis").click(timeout=30_000)
            page.wait_for_url("**/02_overlap_diagnosis.html", timeout=30_000)
            page.wait_for_load_state("load", timeout=30_000)
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            page.locator("img").first.scroll_into_view_if_needed(timeout=30_000)  # a figure in the screenshot
            shot = tmp_path / "02_overlap_diagnosis.png"
            page.screenshot(path=str(shot), timeout=30_000)
        finally:
            browser.close()
    assert widths and max(widths) > 0, "no figure of 02 decoded"
    assert remote == [], f"the pages asked the network for {remote}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
