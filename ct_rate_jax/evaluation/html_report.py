"""report.html: the tables of report.md as HTML, with the plots embedded.

Renders the small Markdown subset that `report.markdown_report` writes (headings,
bullet lists, pipe tables, paragraphs, `code` and **bold**) with the standard library,
so the HTML holds exactly report.md's tables; the PNGs are embedded as base64 data
URIs so that the file is self-contained (it can be mailed or attached to a paper
draft on its own).
"""

from __future__ import annotations

import base64
import html
import re
from typing import Mapping

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;
padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}img{max-width:100%}"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(markdown: str) -> str:
    """HTML body of report.md's Markdown subset."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"(#{1,6}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.startswith("| "):
            header = _cells(line)
            i += 2  # the |---| separator
            rows = []
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(_cells(lines[i]))
                i += 1
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                           for row in rows) + "</tbody></table>")
            continue
        elif line.startswith("* "):
            items = []
            while i < len(lines) and lines[i].startswith("* "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def write_html(path: str, markdown: str, images: Mapping[str, str]) -> None:
    """Writes the report with each PNG of `images` ({title: path}) embedded."""
    figures = []
    for title, image in images.items():
        with open(image, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        figures.append(f"<h2>{html.escape(title)}</h2>"
                       f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    title = markdown.splitlines()[0].lstrip("# ") if markdown else "Evaluation"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
                f"{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
                f"{markdown_to_html(markdown)}\n{''.join(figures)}\n</body></html>\n")
