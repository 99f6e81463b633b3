"""The report as static HTML: every executed notebook exported by nbconvert, and an index.html linking them in order.

The pages sit side by side in the reports folder and link each other by relative file names only, so the folder can
be copied, zipped or served from anywhere. What they hold:

- figures: the notebooks show their figures as image/png outputs (FigureLog.save displays the saved PNG), which
  nbconvert writes inline, ``<img src="data:image/png;base64,...">``: no image file, server or network is needed.
- scripts: nbconvert's lab template loads require.js and MathJax from cdnjs, and, for a notebook with saved widget
  state, the @jupyter-widgets/html-manager renderer from unpkg. Neither text nor figures need them, but a
  ``<script src>`` in <head> that cannot connect holds the page back until the connection fails (at once without a
  network; up to minutes behind a firewall that drops packets). ``offline=True`` (the default) leaves every
  remote script out: LaTeX in markdown cells then shows as its source ($T$), and widgets are not drawn.
- widget state: nbclient, which papermill drives, records the state of the widgets a notebook displayed in
  ``nb.metadata.widgets`` (02's overlap explorer and 03's sampler, with their images as they were when the run
  ended). nbconvert keeps it in the HTML as a ``<script type="application/vnd.jupyter.widget-state+json">`` block,
  and each widget output as a widget-view block; both stay there here too. They are data, not pictures: drawing
  them needs the html-manager from unpkg (``offline=False``), and even then no kernel answers the controls. Offline
  a widget's place says so; the notebooks display static PNGs of what their widgets showed next to them.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..training.io import atomic_write

if TYPE_CHECKING:
    from .report import Step

__all__ = ["html_path", "index_path", "missing_exporter", "export_html", "notebook_status", "write_index"]

# nbconvert's lab template without its remote scripts (require.js, MathJax, mermaid, the widget renderer); the widget
# state and the widget-view data stay where nbconvert puts them, a line of text stands where the widget would be drawn
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_widget_view scoped -%}
<div class="jp-RenderedText jp-OutputArea-output">
{{ super() }}
<pre>[interactive widget: open the executed .ipynb in JupyterLab to use it]</pre>
</div>
{%- endblock data_widget_view -%}
"""
_OFFLINE_NAME = "mixflow_offline.html.j2"


def html_path(notebook: str | Path) -> Path:
    """The HTML export of an executed notebook: beside it, same stem (reports/02_overlap_diagnosis.html)."""
    return Path(notebook).with_suffix(".html")


def index_path(steps: Sequence[Step]) -> Path:
    """<reports>/index.html: beside the last step's executed notebook (and report.json)."""
    return Path(steps[-1].output).parent / "index.html"


def missing_exporter() -> str | None:
    """None where export_html can run; else why not (nbconvert comes with jupyterlab, i.e. the notebooks extra)."""
    if importlib.util.find_spec("nbconvert") is None:
        return "nbconvert is not installed (pip install nbconvert; jupyterlab brings it)"
    return None


@lru_cache(maxsize=2)
def _exporter(offline: bool):
    """One HTMLExporter per mode: building one loads the templates and inlines the lab CSS (a few hundred ms)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    if not offline:
        return HTMLExporter(template_name="lab")
    return HTMLExporter(template_name="lab", template_file=_OFFLINE_NAME,
                        extra_loaders=[DictLoader({_OFFLINE_NAME: _OFFLINE_TEMPLATE})])


def export_html(notebook: str | Path, out: str | Path | None = None, offline: bool = True) -> Path:
    """Write the executed `notebook` as one self-contained HTML page (nbconvert's lab template); its path.

    Args:
        notebook: an executed .ipynb (papermill's output).
        out: where to write; default html_path(notebook).
        offline: leave nbconvert's remote scripts out (see the module docstring); False keeps the lab template as is.

    Figures (image/png outputs) are inline base64 PNGs; saved widget state stays in the page as nbconvert keeps it.
    """
    import nbformat

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    body, _ = _exporter(offline).from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    return _write(html_path(notebook) if out is None else out, body)


def _write(path: str | Path, page: str) -> Path:
    """Atomically, as UTF-8 (what the pages declare), whatever the locale."""
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def notebook_status(notebook: str | Path) -> str:
    """'missing' (no HTML export), 'failed' (papermill marked an exception), 'incomplete' (cells never ran) or 'done'.

    An export exists only for a notebook papermill finished or stopped at a failing cell (run_report exports it then).
    """
    return _status(Path(notebook))[0]


def _status(notebook: Path) -> tuple[str, dict]:
    """notebook_status, and papermill's notebook metadata (duration, exception, ...; {} where missing)."""
    if not html_path(notebook).is_file() or not notebook.is_file():
        return "missing", {}
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    meta = nb.get("metadata", {}).get("papermill", {})
    cells = [c.get("metadata", {}).get("papermill", {}).get("status") for c in nb.get("cells", [])]
    if meta.get("exception"):
        return "failed", meta
    return ("incomplete" if any(s in ("pending", "running") for s in cells) else "done"), meta


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45; color: #1f2328;
       max-width: 64rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; } h3 { font-size: 1rem; }
.meta, .why { color: #59636e; } .meta { margin-top: 0; }
ol.steps li { margin: .35rem 0; } ol.steps a.page { font-weight: 600; }
.status { font-size: .85em; padding: 0 .35em; border-radius: .25em; }
.failed, .incomplete { background: #ffebe9; color: #a40e26; } .missing { background: #eaeef2; color: #59636e; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9em; }
th, td { border: 1px solid #d1d9e0; padding: .2rem .5rem; text-align: left; } th { background: #f6f8fa; }
code { font-size: .9em; }
"""


def _href(target: Path, folder: Path) -> str:
    """A relative, URL-quoted link from a page in `folder` to `target`."""
    return quote(Path(os.path.relpath(target, folder)).as_posix())


def _entry(step: Step, folder: Path) -> str:
    output, page = Path(step.output), html_path(step.output)
    name, title = html.escape(output.stem), html.escape(step.title)
    status, meta = _status(output)
    if status == "missing":
        return (f'<li><span class="missing status">missing</span> {name}: {title} '
                f'<span class="why">(not run in this report, or it stopped before)</span></li>')
    seconds = meta.get("duration")
    took = f"{seconds:.0f} s · " if isinstance(seconds, (int, float)) else ""
    flag = "" if status == "done" else f' <span class="{status} status">{status}</span>'
    return (f'<li><a class="page" href="{_href(page, folder)}">{name}</a>{flag}: {title} '
            f'<span class="meta">({took}<a href="{_href(output, folder)}">ipynb</a>)</span></li>')


def _table(table_md: Path, folder: Path) -> str:
    """The results markdown as HTML (nbconvert's mistune renderer, as for markdown cells, less the headings' ¶ anchor
    links: pipe tables become <table>); without nbconvert, the markdown as it is, in <pre>."""
    text = table_md.read_text(encoding="utf-8")
    if missing_exporter() is None:
        from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

        body = MarkdownWithMath(renderer=IPythonRenderer(escape=False, exclude_anchor_links=True)).render(text)
    else:
        body = f"<pre>{html.escape(text)}</pre>"
    where = html.escape(Path(os.path.relpath(table_md, folder)).as_posix())
    return f'<h2>Results</h2>\n<p class="meta">from <code>{where}</code>, written by 04_report_figures</p>\n{body}'


def write_index(steps: Sequence[Step], table_md: str | Path | None = None, now: datetime | None = None) -> Path:
    """Write index_path(steps): the report's notebooks in order, each linked to its HTML export; its path.

    Args:
        steps: the report's notebook executions (report.plan); each is listed with its title, linked where its HTML
            export exists (marked failed or incomplete as papermill recorded it), marked missing where it does not.
        table_md: the results table (markdown) to show below the list; None or a missing file: no table.
        now: the date to print (default: now, UTC).

    The page needs no JavaScript and links by relative paths only.
    """
    index = index_path(steps)
    folder = index.parent
    first = next((s.parameters for s in steps if "dataset" in s.parameters), {})
    dataset, profile = first.get("dataset"), first.get("profile")
    what = html.escape(f"{dataset}, {profile} profile" if dataset and profile else str(dataset or ""))
    classes = (first.get("overrides") or {}).get("data.classes")
    details = [f"seed {first['seed']}" if "seed" in first else "",
               f"device {first['device']}" if first.get("device") else "",
               f"classes {', '.join(map(str, classes))}" if classes else "",
               f"written {(now or datetime.now(timezone.utc)).strftime('%Y-%m-%d %H:%M %Z').strip()}"]
    entries = "\n".join(_entry(s, folder) for s in steps)
    table = _table(Path(table_md), folder) if table_md and Path(table_md).is_file() else ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mixflow report{": " + what if what else ""}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>mixflow report{": " + what if what else ""}</h1>
<p class="meta">{html.escape(" · ".join(d for d in details if d))}</p>
<h2>Notebooks</h2>
<ol class="steps">
{entries}
</ol>
{table}
</body>
</html>
"""
    return _write(index, page)
