"""The self-contained HTML report."""
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from nnunet_kaz.report import HtmlReport  # noqa: E402


def test_report_embeds_figures_and_tables_and_escapes_text(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "f.png")
    rep = HtmlReport("a <title>")
    rep.heading("Section & more")
    rep.table(pd.DataFrame({"method": ["x"], "dice": [0.81234]}))
    rep.figure(tmp_path / "f.png", "caption")
    rep.figure(tmp_path / "missing.png", "gone")
    path = rep.write(tmp_path / "report.html")
    html = path.read_text()
    assert "data:image/png;base64," in html and "0.812" in html
    assert "a &lt;title&gt;" in html and "Section &amp; more" in html
    assert "missing.png missing" in html
    # self-contained: no external sources or links
    assert not re.search(r"(src|href)=['\"](?!data:)", html)
