"""The demo-style report opened in a real browser (headless Chromium): contents list, every section's n and unit,
no table wider than the page, every figure loaded and within the page (issue 25 item 7).

Chromium comes from the system's package manager (Debian's `chromium`; `.ci/run` installs it where it runs as
root). Without it the browser test says it skipped; the static checks run anyway."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nnunet_kaz.report import HtmlReport  # noqa: E402

WIDTH, HEIGHT = 1280, 900  # a laptop screen
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000",
                  f"--window-size={WIDTH},{HEIGHT}"]
# measures the laid-out page once everything (the embedded figures too) has loaded, into <pre id="measure">
MEASURE = """<script>
window.addEventListener('load', () => {
  const page = document.documentElement, body = document.body.getBoundingClientRect();
  const out = {viewport: page.clientWidth, scroll_width: page.scrollWidth, body_right: body.right, tables: [],
               images: []};
  document.querySelectorAll('table').forEach(t => {
    const box = t.parentElement;
    out.tables.push({width: t.getBoundingClientRect().width, box_width: box.clientWidth,
                     box_right: box.getBoundingClientRect().right, box_class: box.className,
                     first: t.querySelector('th') ? t.querySelector('th').textContent : ''});
  });
  document.querySelectorAll('img').forEach(im => out.images.push(
    {complete: im.complete, natural: im.naturalWidth, right: im.getBoundingClientRect().right, alt: im.alt}));
  const pre = document.createElement('pre'); pre.id = 'measure'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def measure(report: Path, tmp: Path) -> dict:
    """Open a copy of `report` with the measuring script in headless Chromium (fresh profile, network off)."""
    copy = tmp / f"measured_{report.name}"
    copy.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    profile = tmp / "chromium-profile"
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                           copy.resolve().as_uri()], capture_output=True, text=True, timeout=None)
    found = re.search(r'<pre id="measure">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no measurement in Chromium's DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def synthetic_comparison(folder: Path, methods: list[str]) -> Path:
    """A comparison/ folder as `nnunet-kaz compare` writes it (comparison.csv with every column family:
    figures, intervals, paired differences and p-values; comparison.json with grouping and bootstrap)."""
    rng = np.random.default_rng(0)
    figures = ["dice_mean", "hd95_mean", *(f"{m}_{s}" for m in ("ece", "ace", "mce", "brier") for s in ("all", "roi")),
               *(f"{m}_macro_{s}" for m in ("ece", "ace", "mce") for s in ("all", "roi")), "aurc", "e_aurc", "augrc",
               "risk_80cov", "ncc_raters", "roi_auroc_raters"]
    rows = []
    for i, m in enumerate(methods):
        row = {"method": m, "n_cases": 36, "n_patients": 3, "hd95_std": 2.0, "hd95_nan": i % 2, "dice_std": 0.1,
               "auroc_all": 0.9, "auroc_roi": 0.8, "aurc_source": "unc_mean", "roi_auroc_raters_pooled": 0.7,
               "reference": i == 0}
        for f in figures:
            v = rng.random() * (20 if f.startswith("hd95") else 1)
            row |= {f: v, f"{f}_ci_low": v * 0.9, f"{f}_ci_high": v * 1.1}
            if i:
                row |= {f"{f}_diff": v - 0.5, f"{f}_diff_ci_low": v - 0.6, f"{f}_diff_ci_high": v - 0.4,
                        f"{f}_p": 0.25, f"{f}_p_holm": 1.0}
        for s in ("mean_entropy", "relunet_score", "relunet_score_cross", "cv", "pairwise_dice",
                  "pairwise_dice_pooled", "labelled_uncertainty"):
            row |= {f"rho_{s}": rng.uniform(-1, 1), f"p_{s}": rng.random()}
        rows.append(row)
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "comparison.csv", index=False)
    info = {"reference": methods[0], "grouping": {"n_patients": 3, "n_cases": 36, "source": "kaz_meta.json"},
            "bootstrap": {"confidence": 0.95, "n_resamples": 2000, "seed": 0, "method": "percentile"}}
    (folder / "comparison.json").write_text(json.dumps({"settings": info}))
    return folder


def demo_style_report(tmp: Path) -> Path:
    """The demo report's comparison, TTA and calibrator sections on comparison folders as compare writes them,
    wide pandas tables as the other sections have, and figures wider than the page."""
    from nnunet_kaz.demo_report import comparison_meta, comparison_section, tta_section

    methods = ["single model", "fold ensemble (2 folds)", "MC dropout (10 samples)", "seed ensemble (2 seeds)",
               "SGDR snapshots", "test-time augmentation (4 flips)", "2 seeds x 2 folds x MC 5",
               "2 seeds (fold 0) x MC 5", "+ calibration + post-processing"]
    cmp = synthetic_comparison(tmp / "comparison", methods)
    cals = synthetic_comparison(tmp / "comparison_calibrators",
                                [f"2 seeds (fold 0) x MC 5: {c}" for c in ("none", "logistic (paper 000)", "platt",
                                                                           "temperature", "isotonic")])
    figs = []
    for i, size in enumerate(((17, 3.6), (5.2, 4.0))):  # the demo's widest figure (1530 px at 90 dpi) and a small one
        fig, ax = plt.subplots(figsize=size)
        ax.plot([0, 1], [0, i + 1])
        figs.append(tmp / f"f{i}.png")
        fig.savefig(figs[-1], dpi=90)
        plt.close(fig)
    rep = HtmlReport("nnunet-kaz demo: a report that fits the page")
    rep.text("A demo-style report.")
    rep.heading("Methods compared on the held-out patients", comparison_meta(cmp, "Dice unitless, HD95 in pixels"))
    table = comparison_section(rep, cmp)
    rep.figure(figs[0], "wide")
    tta_section(rep, cmp, table)
    rep.heading("Calibrators side by side", comparison_meta(cals, "unitless"))
    comparison_section(rep, cals)
    rep.heading("Uncertainty against error", "n = 36 test slices; pixel counts")
    cols = ["label", "T", "tp", "fp", "fn", "uncertain", "uncertain_tn", "filtered_tp", "filtered_fp", "filtered_fn"]
    rep.table(pd.DataFrame(np.arange(40.0).reshape(4, 10), columns=cols))
    rep.heading("Conformal risk control", "n = 36 test slices; unitless")
    rep.table(pd.DataFrame([{"label": "ablation_zone", "alpha": 0.1, "mean_fnr": 0.08, "mean_fnr_ci_low": 0.05,
                             "mean_fnr_ci_high": 0.11, "mean_fnr_at_most_alpha": True, "n_cases": 36,
                             "n_cases_with_label": 36, "max_fnr": 0.3, "mean_mask_over_segmentation": 1.4,
                             "mean_mask_over_gt": 1.2}]), digits=4)
    rep.figure(figs[1], "small")
    rep.heading("Commands run", "n = 3 commands; seconds")
    rep.table(pd.DataFrame({"command": ["nnunet-kaz predict", "nnunet-kaz compare", "nnUNetv2_train 501"],
                            "seconds": [1.0, 2.0, 3.0]}), digits=1)
    return rep.write(tmp / "report.html")


def test_report_has_contents_and_every_section_states_n_and_unit(tmp_path):
    text = demo_style_report(tmp_path).read_text()
    anchors = re.findall(r"<h2 id='(s\d+)'>", text)
    assert len(anchors) == 6
    toc = re.search(r"<nav class='toc'>.*?</nav>", text).group(0)
    assert re.findall(r"href='#(s\d+)'", toc) == anchors                    # the contents list, in order, at the top
    assert text.index("<nav class='toc'>") < text.index("<h2 id='s1'>")
    for a in anchors:                                                        # n and unit right under every heading
        after = text[text.index(f"<h2 id='{a}'>"):]
        assert re.match(r"<h2 id='s\d+'>[^<]*</h2>\n<p class='meta'>n = \d+ [^<]*; [^<]+</p>", after)
    assert re.search("<td>\\d\\.\\d{3} \\[\\d\\.\\d+,\u00a0\\d\\.\\d+\\]</td>", text)  # 0.866 [0.84, 0.89]
    assert text.count("<div class='tbl'><table") == text.count("<table")    # every table in its own box


@pytest.mark.skipif(chromium() is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_report_fits_the_page_in_a_real_browser(tmp_path):
    """In a 1280 x 900 window: the page does not scroll sideways; every table fits its box (the box: the page's width) without
    scrolling, except the deliberately wide one, which scrolls inside its box; every figure decoded (natural
    width > 0) and within the page."""
    report = demo_style_report(tmp_path)
    m = measure(report, tmp_path)
    assert WIDTH - 20 <= m["viewport"] <= WIDTH  # the window, less a vertical scroll bar
    assert m["scroll_width"] <= m["viewport"]
    assert len(m["tables"]) >= 10 and len(m["images"]) == 2
    for t in m["tables"]:
        assert t["box_class"] == "tbl" and t["box_right"] <= m["body_right"] + 0.5
        assert t["width"] <= t["box_width"] + 0.5, t
    for im in m["images"]:
        assert im["complete"] and im["natural"] > 0 and im["right"] <= m["body_right"] + 0.5, im


@pytest.mark.skipif(chromium() is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_a_table_too_wide_to_wrap_scrolls_inside_its_box(tmp_path):
    """30 columns of unbreakable numbers cannot wrap to 1200 px: the table scrolls inside its box and the page
    itself stays the window's width."""
    rep = HtmlReport("wide")
    rep.heading("Wide", "n = 1 row; unitless")
    rep.table(pd.DataFrame([np.arange(30) * 1234567.0], columns=[f"column_{i}" for i in range(30)]))
    m = measure(rep.write(tmp_path / "wide.html"), tmp_path)
    (t,) = m["tables"]
    assert t["width"] > t["box_width"] and t["box_right"] <= m["body_right"] + 0.5
    assert m["scroll_width"] <= m["viewport"]
