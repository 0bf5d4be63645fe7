"""The replay report as one self-contained HTML page: report.html beside report.md.

It renders the very `Report` that report.md is written from (same tables, same formatted cells,
same PNG bytes), so the two never disagree. Every plot is embedded as a base64 data URI and the
only style is inline CSS: the page needs no other file, no network and no script. Every string
from the data (policy and trace names, meta values, table cells) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from agent.bench.report import Plot, Report, Section

FILE_NAME = "report.html"
_CODE_SPAN = re.compile(r"`([^`]+)`")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; font-size: 0.9em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code { font-family: ui-monospace, monospace; font-size: 0.92em; background: #f3f3f3; padding: 0 0.2em; }
.table { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88em; white-space: nowrap; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.6em; }
th { background: #eef2f7; text-align: left; white-space: normal; vertical-align: bottom; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { text-align: left; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.85em; color: #555; }
"""


def write_html_report(out_dir: Path, report: Report) -> Path:
    """Write report.html into `out_dir`; return its path."""
    path = out_dir / FILE_NAME
    path.write_text(render_html(report), encoding="utf-8")
    return path


def render_html(report: Report) -> str:
    """The whole page."""
    meta = "".join(f"<dt>{_text(key)}</dt><dd><code>{_text(value)}</code></dd>" for key, value in report.meta)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(report.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_text(report.title)}</h1>\n"
        f'<dl class="meta">{meta}</dl>\n'
        f"<p>{_inline(report.intro)}</p>\n"
        + "".join(_section(section) for section in report.sections)
        + "</body>\n</html>\n"
    )


def _section(section: Section) -> str:
    head = "".join(f'<th scope="col">{_text(column)}</th>' for column in section.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in section.rows
    )
    return (
        f'<section id="{_text(section.label)}">\n<h2>{_text(section.heading)}</h2>\n'
        + "".join(f"<p>{_inline(note)}</p>\n" for note in section.notes)
        + f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>\n'
        + "".join(f"<p>{_inline(remark)}</p>\n" for remark in section.remarks)
        + "".join(_figure(plot) for plot in section.plots)
        + "</section>\n"
    )


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_text(plot.alt)}">'
        f"<figcaption>{_text(plot.alt)} ({_text(plot.file_name)})</figcaption></figure>\n"
    )


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _inline(value: str) -> str:
    """Escaped text with its `code` spans (the report's one piece of markup) as <code> elements."""
    return _CODE_SPAN.sub(r"<code>\1</code>", _text(value))
