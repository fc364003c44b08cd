"""A self-contained HTML report: tables and PNG figures embedded (base64), no external files or scripts."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from nnunet_kaz.io_utils import atomic_path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
h1{border-bottom:2px solid #446}h2{margin-top:2em;color:#334}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}th{background:#eef}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
.note{color:#555}code{background:#f4f4f8;padding:0 .2em}"""


class HtmlReport:
    """Collect sections (text, tables, figures) and write them as one self-contained HTML file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre><code>{html.escape(text)}</code></pre>")

    def table(self, df: pd.DataFrame, digits: int = 3) -> None:
        self.parts.append(df.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="n/a",
                                     border=0))

    def figure(self, png: Path, caption: str = "") -> None:
        png = Path(png)
        if not png.is_file():
            self.text(f"(figure {png.name} missing)", "note")
            return
        data = base64.b64encode(png.read_bytes()).decode()
        self.parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(png.name)}'>"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def write(self, path: Path) -> Path:
        body = "\n".join(self.parts)
        doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>")
        with atomic_path(path) as tmp:
            tmp.write_text(doc)
        return Path(path)
