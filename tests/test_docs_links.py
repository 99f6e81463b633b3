"""Every relative link and image in README.md and docs/*.md points at a file or folder that exists.

Links are Markdown's [text](target) and ![alt](target) (targets without a scheme; a #fragment is ignored) and
HTML src / href attributes; each resolves relative to the file that holds it, as GitHub and browsers resolve it.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # links inside code are examples, not links


def relative_targets(text: str) -> list[str]:
    """The relative link targets of a Markdown text, in order, fragments and queries stripped.

    >>> relative_targets("see [a](docs/a.md#x), ![f](fig.png), [web](https://x.org), `[no](code.md)`, [top](#t)")
    ['docs/a.md', 'fig.png']
    """
    text = CODE.sub("", text)
    out = []
    for target in [*LINK.findall(text), *HTML.findall(text)]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        out.append(re.split(r"[#?]", target)[0])
    return out


def test_the_docs_folder_and_readme_exist():
    assert (ROOT / "docs").is_dir() and len(DOCS) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_exists(doc):
    missing = [t for t in relative_targets(doc.read_text()) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing paths: {missing}"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in relative_targets((ROOT / "README.md").read_text())}
    assert {p.resolve() for p in DOCS[1:]} <= linked, "a docs/ page the README does not link"


def test_the_check_catches_a_missing_target(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("![gone](figures/none.png) and [ok](x.md)")
    assert [t for t in relative_targets(doc.read_text()) if not (doc.parent / t).exists()] == ["figures/none.png"]
