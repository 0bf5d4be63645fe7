"""report.html: the markdown report's content as one page, escaped and needing no other file."""

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

from agent.bench.html_report import render_html, write_html_report
from agent.bench.report import write_report
from tests.unit.test_report import PNG_MAGIC, record, table_rows

HOSTILE_POLICY = 'static:<script>alert("x")</script>'
HOSTILE_TRACE = "traces/a&b <i>c</i>.csv"


class Page(HTMLParser):
    """What the page holds: tags with their attributes, table cells, all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_cell:
            self.cells[-1] += data


def parsed(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def test_names_from_the_data_are_escaped_and_shown_as_given(tmp_path: Path) -> None:
    runs = [
        record("max", 200.0, 1410, n=50, trace=HOSTILE_TRACE),
        record(HOSTILE_POLICY, 150.0, 1050, n=50, trace=HOSTILE_TRACE),
    ]
    report = write_report(tmp_path, runs, {"note": "<b>bold</b> & more"})
    page = render_html(report)
    assert "<script" not in page and "<i>" not in page and "<b>" not in page
    html = parsed(page)
    assert HOSTILE_POLICY in html.cells  # the policy's row, its name intact once unescaped
    assert any(HOSTILE_TRACE in text for text in html.text)  # in the heading
    assert "<b>bold</b> & more" in html.text
    assert not [tag for tag, _ in html.tags if tag == "script"]


def test_the_page_is_self_contained_and_carries_the_markdown_tables_and_plots(tmp_path: Path) -> None:
    runs = [record("max", 200.0, 1410, n=50), record("throttllem", 120.0, 1000, n=50, length_error=30.0)]
    report = write_report(tmp_path, runs, {"gpu": "a100-sxm4-80gb"})
    path = write_html_report(tmp_path, report)
    page = path.read_text()
    html = parsed(page)
    links = [
        value
        for _, attrs in html.tags
        for key, value in attrs.items()
        if key in ("src", "href") and value is not None
    ]
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert not re.search(r"(?i)https?:|url\(|@import", page)  # nothing fetched, not even from CSS
    # The same PNG bytes as the files report.md links, in the same order.
    (section,) = report.sections
    embedded = [base64.b64decode(link.split(",", 1)[1]) for link in links]
    assert embedded == [(tmp_path / plot.file_name).read_bytes() for plot in section.plots]
    assert all(png.startswith(PNG_MAGIC) for png in embedded)
    # The same table cells as report.md.
    header, *rows = table_rows((tmp_path / "report.md").read_text())
    assert html.cells == [*header, *(cell for row in rows for cell in row)]
