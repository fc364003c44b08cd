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
    rep.table(pd.DataFrame({"label": [1], "aurc": [0.1234], "aurc_ci_low": [0.101], "aurc_ci_high": [0.1561]}))
    rep.figure(tmp_path / "f.png", "caption")
    rep.figure(tmp_path / "missing.png", "gone")
    path = rep.write(tmp_path / "report.html")
    html = path.read_text()
    assert "data:image/png;base64," in html and "0.812" in html
    assert "<td>0.123 [0.10,\u00a00.16]</td>" in html and "aurc_ci_low" not in html  # an interval in one cell,
    # which may wrap before its bracket but not inside it
    assert "a &lt;title&gt;" in html and "Section &amp; more" in html
    assert "missing.png missing" in html
    # self-contained: no external sources or links (only the contents list's links to its own sections)
    assert not re.search(r"(src|href)=['\"](?!data:|#)", html)
    assert "<a href='#s1'>Section &amp; more</a>" in html


def test_demo_conformal_table_by_hand(tmp_path):
    """The demo report's realised FNR per case: 1 - |C & G| / |G|, 0 for an empty ground truth, and the mask's
    size against the segmentation and the ground truth, on PNGs written here."""
    import json

    import numpy as np
    from PIL import Image

    from nnunet_kaz.demo_report import conformal_table

    gt_dir, pred = tmp_path / "labelsTs", tmp_path / "pred"
    gt_dir.mkdir()
    pred.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "zone": 1},
                                                       "file_ending": ".png"}))
    gt = np.zeros((5, 7), np.uint8)
    gt[1:3, 1:5] = 1  # 8 pixels
    conf = np.zeros_like(gt)
    conf[1:3, 1:4] = 1  # covers 6 of them
    conf[4, 6] = 1  # and one outside: 7 pixels
    seg = np.zeros_like(gt)
    seg[1, 1:5] = 1  # 4 pixels
    for case, (g, c, s) in {"a": (gt, conf, seg), "b": (np.zeros_like(gt), conf, seg)}.items():
        Image.fromarray(g).save(gt_dir / f"{case}.png")
        Image.fromarray(c).save(pred / f"{case}_conformal_zone.png")
        Image.fromarray(s).save(pred / f"{case}.png")
    t = conformal_table(pred, gt_dir, "zone").set_index("case")
    assert t.loc["a", "fnr"] == 1 - 6 / 8 and t.loc["a", "segmentation_fnr"] == 1 - 4 / 8
    assert t.loc["a", "mask_vs_segmentation"] == 7 / 4 and t.loc["a", "mask_vs_gt"] == 7 / 8
    assert t.loc["b", "fnr"] == 0.0 and np.isnan(t.loc["b", "mask_vs_gt"])
