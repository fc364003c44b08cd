"""A self-contained HTML report: tables and PNG figures embedded (base64), no external files or scripts.

Layout (issue 25): a contents list at the top linking every section; every section states its n and unit (a
line under its heading); every table sits in its own box of the page's width that scrolls sideways if the table
cannot wrap to fit (cells wrap at spaces, headers anywhere), so no table makes the page wider; figures scale
to the page width.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from nnunet_kaz.io_utils import atomic_path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #446}h2{margin-top:2em;color:#334}h3{color:#445;margin:1.2em 0 .3em}
.tbl{max-width:100%;overflow-x:auto;margin:.6em 0 1em}
table{border-collapse:collapse;max-width:100%}
td,th{border:1px solid #bbb;padding:.25em .5em;text-align:right;vertical-align:top;overflow-wrap:break-word}
th{background:#eef;overflow-wrap:anywhere;font-weight:600}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.5em 0}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}.note{color:#555}.meta{color:#446;font-size:.9em;margin-top:-.4em}
nav.toc ol{columns:2;column-gap:3em}nav.toc li{margin:.15em 0}code{background:#f4f4f8;padding:0 .2em}"""


def _keep_intervals_whole(text: str) -> str:
    """An interval `[0.84, 0.89]` breaks only before its bracket, never inside (a no-break space after the comma)."""
    return re.sub(r"\[([^\]\s]*), ([^\]\s]*)\]", "[\\1,\u00a0\\2]", text)


class HtmlReport:
    """Collect sections (text, tables, figures) and write them as one self-contained HTML file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.sections: list[tuple[str, str]] = []  # (anchor, heading) for the contents list

    def heading(self, text: str, meta: str | None = None) -> None:
        """A section (listed in the contents) and, under it, `meta`: its n and unit ("n = 36 slices of 3
        patients; Dice unitless, HD95 in pixels")."""
        anchor = f"s{len(self.sections) + 1}"
        self.sections.append((anchor, text))
        self.parts.append(f"<h2 id='{anchor}'>{html.escape(text)}</h2>")
        if meta:
            self.parts.append(f"<p class='meta'>{html.escape(meta)}</p>")

    def subheading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def text(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre><code>{html.escape(text)}</code></pre>")

    def table(self, df: pd.DataFrame, digits: int = 3) -> None:
        """A DataFrame, floats with `digits` decimals, in its own box of the page's width; a column M with
        M_ci_low and M_ci_high beside it is shown as one column `0.866 [0.84, 0.89]`."""
        from nnunet_kaz.evaluation.intervals import fmt_ci

        ci = [c for c in df.columns if f"{c}_ci_low" in df.columns and f"{c}_ci_high" in df.columns]
        if ci:
            df = df.copy()
            for c in ci:
                df[c] = [_keep_intervals_whole(fmt_ci(v, lo, hi))
                         for v, lo, hi in zip(df[c], df[f"{c}_ci_low"], df[f"{c}_ci_high"])]
            df = df.drop(columns=[f"{c}_ci_{e}" for c in ci for e in ("low", "high")])
        body = df.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="n/a", border=0)
        self.parts.append(f"<div class='tbl'>{body}</div>")

    def rows(self, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table of preformatted cells (e.g. `0.866 [0.84, 0.89]`), in its own box of the page's width."""
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_keep_intervals_whole(str(c)))}</td>" for c in r) + "</tr>"
                      for r in rows)
        self.parts.append(f"<div class='tbl'><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>")

    def figure(self, png: Path, caption: str = "") -> None:
        png = Path(png)
        if not png.is_file():
            self.text(f"(figure {png.name} missing)", "note")
            return
        data = base64.b64encode(png.read_bytes()).decode()
        self.parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(png.name)}'>"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def contents(self) -> str:
        if not self.sections:
            return ""
        items = "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>" for a, t in self.sections)
        return f"<nav class='toc'><h2>Contents</h2><ol>{items}</ol></nav>"

    def write(self, path: Path) -> Path:
        body = "\n".join(self.parts)
        doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
               f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
               f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
               f"<h1>{html.escape(self.title)}</h1>\n{self.contents()}\n{body}\n</body></html>")
        with atomic_path(path) as tmp:
            tmp.write_text(doc)
        return Path(path)
