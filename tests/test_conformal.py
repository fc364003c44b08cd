"""Conformal risk control of the false-negative rate: exact lambda-hat by hand and by brute force, coverage."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_kaz.conformal import FNRControl, false_negative_rate, min_cases
from nnunet_kaz.errors import KazError


def _cases_by_hand():
    # case A: labelled probabilities 0.9, 0.6, 0.6 (a tie), 0.2; case B: label absent; case C: 0.8, 0.3
    a_p = np.array([0.9, 0.6, 0.6, 0.2, 0.95, 0.1])
    a_y = np.array([1, 1, 1, 1, 0, 0], bool)
    b_p = np.array([0.7, 0.4, 0.99])
    b_y = np.zeros(3, bool)
    c_p = np.array([[0.8, 0.3], [0.5, 0.05]])
    c_y = np.array([[1, 1], [0, 0]], bool)
    return [(a_p, a_y), (b_p, b_y), (c_p, c_y)]


def test_lambda_hat_by_hand_with_ties_and_an_absent_label():
    # n = 3, alpha = 0.5: need 3/4 R(t) + 1/4 <= 1/2, i.e. mean FNR R(t) <= 1/3.
    # t = 0.6: A misses only 0.2 (the tied 0.6s are in the mask) -> 1/4; B -> 0; C misses 0.3 -> 1/2; R = 1/4.
    # t = 0.8: A misses 0.2, 0.6, 0.6 -> 3/4; C -> 1/2; R = 5/12 > 1/3. So t = 0.6, lambda = 0.4.
    ctl = FNRControl(alpha=0.5).fit(_cases_by_hand())
    assert ctl.threshold_ == 0.6
    assert ctl.lambda_hat_ == pytest.approx(0.4)
    assert ctl.validation_risk_ == pytest.approx(0.25)
    assert ctl.n_cases_ == 3 and ctl.n_cases_with_label_ == 2
    np.testing.assert_array_equal(ctl.transform(np.array([0.59, 0.6, 0.61])), [False, True, True])


def _brute_force_threshold(cases, alpha):
    """Smallest lambda on every candidate (1 - each probability value, and 0, 1) that meets eq. 4, evaluated with the
    per-case FNR directly."""
    n = len(cases)
    values = np.unique(np.concatenate([p.ravel() for p, _ in cases] + [np.array([0.0, 1.0])]))
    best = None
    for t in values[::-1]:  # largest threshold first = smallest lambda
        risk = np.mean([false_negative_rate(p, y, t) for p, y in cases])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha + 1e-12:
            best = t
            break
    return best


@pytest.mark.parametrize("seed", range(6))
def test_lambda_hat_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(int(rng.integers(12, 30))):
        shape = tuple(int(s) for s in rng.integers(2, 9, size=int(rng.integers(1, 4))))
        p = np.round(rng.random(shape), 2)  # rounding makes ties
        y = rng.random(shape) < (0.0 if i % 5 == 0 else 0.4)  # every fifth case has no label
        cases.append((p, y))
    for alpha in (0.1, 0.2, 0.35):
        ctl = FNRControl(alpha=alpha).fit(cases)
        assert ctl.threshold_ == _brute_force_threshold(cases, alpha)


def test_label_absent_everywhere_gives_the_smallest_mask():
    cases = [(np.random.default_rng(i).random(10), np.zeros(10, bool)) for i in range(10)]
    assert FNRControl(alpha=0.1).fit(cases).threshold_ == 1.0


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_the_open_interval_is_refused(alpha):
    with pytest.raises(KazError, match="alpha"):
        FNRControl(alpha=alpha).fit(_cases_by_hand())


def test_too_few_cases_for_the_bound():
    assert min_cases(0.1) == 9 and min_cases(0.05) == 19 and min_cases(0.2) == 4
    cases = [(np.array([0.5]), np.array([True]))] * 8
    with pytest.raises(KazError, match="at least 9"):
        FNRControl(alpha=0.1).fit(cases)
    FNRControl(alpha=0.1).fit(cases + cases[:1])  # nine are enough


def test_shape_mismatch_is_refused():
    with pytest.raises(KazError, match="does not match"):
        FNRControl(alpha=0.5).fit([(np.zeros((2, 3)), np.zeros((3, 2), bool))] * 3)


def synthetic_cases(rng: np.random.Generator, n: int, size: int = 24):
    """Exchangeable toy cases: a disc of random radius (absent in ~10% of cases), probabilities a noisy sigmoid of
    the signed distance to a shifted, rescaled disc (a model that is sometimes too small, sometimes too large)."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        c = size / 2 + rng.normal(0, 2, 2)
        r = rng.uniform(3, 8) if rng.random() > 0.1 else 0.0
        d = np.hypot(yy - c[0], xx - c[1])
        label = d <= r
        r_model = max(r * rng.uniform(0.7, 1.2), 1.0)
        logit = 1.5 * (r_model - np.hypot(yy - c[0] - rng.normal(0, 1), xx - c[1] - rng.normal(0, 1)))
        p = 1 / (1 + np.exp(-(logit + rng.normal(0, 1.0, label.shape))))
        out.append((p, label))
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_over_random_draws(alpha):
    """Theorem 1: E[FNR of a new case] <= alpha. Over 200 independent draws of 40 validation and 40 test cases the
    mean realised test FNR stays below alpha plus 3 standard errors, and not far below (the bound is tight up to
    ~2/(n+1) for continuous scores)."""
    rng = np.random.default_rng(int(alpha * 1000))
    realised = []
    for _ in range(200):
        cases = synthetic_cases(rng, 80)
        ctl = FNRControl(alpha=alpha).fit(cases[:40])
        realised.append(np.mean([false_negative_rate(p, y, ctl.threshold_) for p, y in cases[40:]]))
    realised = np.asarray(realised)
    se = realised.std(ddof=1) / np.sqrt(realised.size)
    assert realised.mean() <= alpha + 3 * se
    assert realised.mean() >= alpha - 2 / 41 - 3 * se


# --- the command --------------------------------------------------------------------------------------------------
def _write_folder(root, n_cases: int, regions: bool = False, shape=(12, 14), seed: int = 0):
    """nnU-Net-style validation folder: CASE.npz probabilities (C, 1, H, W as nnU-Net writes 2D) and CASE.png labels
    with a dataset.json; returns {case: (probabilities, label map)}."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    probs_dir, gt_dir = root / "probs", root / "gt"
    probs_dir.mkdir(parents=True)
    gt_dir.mkdir()
    labels = ({"background": 0, "kidney_and_mass": [1, 2], "mass": [2]} if regions
              else {"background": 0, "zone": 1, "cyst": 2})
    (gt_dir / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".png"}))
    out = {}
    for i in range(n_cases):
        lab = rng.integers(0, 3, shape).astype(np.uint8)
        if i % 4 == 0:
            lab[lab == 1] = 0  # some cases without label 1
        if regions:
            p = rng.random((2, *shape)).astype(np.float32)
        else:
            p = rng.dirichlet([1, 1, 1], shape).transpose(2, 0, 1).astype(np.float32)
        np.savez_compressed(probs_dir / f"c{i:02d}.npz", probabilities=p[:, None])
        Image.fromarray(lab).save(gt_dir / f"c{i:02d}.png")
        out[f"c{i:02d}"] = (p, lab)
    return probs_dir, gt_dir, out


def test_fit_command_equals_the_array_fit(tmp_path):
    import json

    from nnunet_kaz.cli import main

    probs_dir, gt_dir, cases = _write_folder(tmp_path, 12)
    out = tmp_path / "conformal.json"
    assert main(["conformal", "fit", "--probs", str(probs_dir), "--gt", str(gt_dir), "--label", "zone", "2",
                 "--alpha", "0.2", "-o", str(out), "-q"]) == 0
    d = json.loads(out.read_text())
    for entry, label in zip(d["labels"], (1, 2)):
        expected = FNRControl(alpha=0.2).fit((p[label], lab == label) for p, lab in cases.values())
        assert entry["channel"] == label and entry["threshold"] == expected.threshold_
    assert [x["name"] for x in d["labels"]] == ["zone", "cyst"]


def test_fit_command_on_regions(tmp_path):
    import json

    from nnunet_kaz.cli import main

    probs_dir, gt_dir, cases = _write_folder(tmp_path, 10, regions=True)
    out = tmp_path / "c.json"
    assert main(["conformal", "fit", "--probs", str(probs_dir), "--gt", str(gt_dir), "--label", "mass",
                 "kidney_and_mass", "--alpha", "0.3", "-o", str(out), "-q"]) == 0
    d = {x["name"]: x for x in json.loads(out.read_text())["labels"]}
    mass = FNRControl(alpha=0.3).fit((p[1], lab == 2) for p, lab in cases.values())
    kidney = FNRControl(alpha=0.3).fit((p[0], np.isin(lab, [1, 2])) for p, lab in cases.values())
    assert d["mass"]["threshold"] == mass.threshold_ and d["kidney_and_mass"]["threshold"] == kidney.threshold_


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "1.2"], "alpha must lie strictly between 0 and 1"),
    (["--alpha", "0"], "alpha must lie strictly between 0 and 1"),
    (["--label", "tumour"], "not foreground labels of dataset.json"),
    (["--alpha", "0.05"], "cannot meet alpha = 0.05: the bound"),
])
def test_fit_command_bad_input(tmp_path, capsys, extra, message):
    from nnunet_kaz.cli import main

    probs_dir, gt_dir, _ = _write_folder(tmp_path, 12)
    out = tmp_path / "conformal.json"
    args = ["conformal", "fit", "--probs", str(probs_dir), "--gt", str(gt_dir), "--label", "zone", "-o", str(out),
            "-q", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gt", "probs"]


def test_fit_command_shape_mismatch(tmp_path, capsys):
    from PIL import Image

    from nnunet_kaz.cli import main

    probs_dir, gt_dir, _ = _write_folder(tmp_path, 12)
    Image.fromarray(np.zeros((12, 15), np.uint8)).save(gt_dir / "c03.png")
    out = tmp_path / "conformal.json"
    assert main(["conformal", "fit", "--probs", str(probs_dir), "--gt", str(gt_dir), "--label", "zone",
                 "-o", str(out), "-q"]) == 2
    assert "c03" in capsys.readouterr().err and not out.exists()


@pytest.mark.integration
def test_predict_writes_the_conformal_mask_of_the_fitted_threshold(tiny_kaz, tmp_path):
    """fit on the training slices' predictions of a real nnUNetv2_train model, then predict the test slices with
    --conformal: the mask equals {p >= threshold} of the written probabilities, its volume is in scores.csv."""
    import json

    import pandas as pd
    from PIL import Image

    from tests.conftest import run

    member = f"{tiny_kaz.train('nnUNetTrainer_debug')}:0"
    val = tmp_path / "val"
    run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTr"), "-o", str(val), "-m", member, "-device",
         "cpu"], tiny_kaz.env)
    conformal = tmp_path / "conformal.json"
    run(["nnunet-kaz", "conformal", "fit", "--probs", str(val), "--gt", str(tiny_kaz.raw / "labelsTr"), "--label",
         "1", "--alpha", "0.2", "-o", str(conformal)], tiny_kaz.env)
    threshold = json.loads(conformal.read_text())["labels"][0]["threshold"]
    out = tmp_path / "test"
    run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(out), "-m", member, "-device",
         "cpu", "--conformal", str(conformal)], tiny_kaz.env)
    scores = pd.read_csv(out / "scores.csv")
    name = json.loads(conformal.read_text())["labels"][0]["name"]
    assert len(scores) == 3 and (out / "conformal.json").is_file()
    for _, row in scores.iterrows():
        mask = np.asarray(Image.open(out / f"{row.case}_conformal_{name}.png"))
        p = np.load(out / f"{row.case}.npz")["probabilities"][1, 0]
        np.testing.assert_array_equal(mask, (p >= threshold).astype(np.uint8))
        assert row.conformal_volume == mask.sum()
        seg = np.asarray(Image.open(out / f"{row.case}.png"))
        assert mask[seg == 1].all() or threshold > 0.5  # a threshold below 0.5 only grows the mask

    # evaluate --conformal: each case's realised FNR by hand, the mean against alpha
    gt_dir = tiny_kaz.raw / "labelsTs"
    ev = tmp_path / "eval"
    proc = run(["nnunet-kaz", "evaluate", "--pred", str(out), "--gt", str(gt_dir), "--conformal", str(out), "-o",
                str(ev)], tiny_kaz.env)
    table = pd.read_csv(ev / "conformal.csv")
    expected = []
    for _, row in table.iterrows():
        mask = np.asarray(Image.open(out / f"{row.case}_conformal_{name}.png")) > 0
        truth = np.asarray(Image.open(gt_dir / f"{row.case}.png")) == 1
        expected.append((truth & ~mask).sum() / truth.sum() if truth.any() else 0.0)
        assert row.mask_voxels == mask.sum() and row.gt_voxels == truth.sum()
    np.testing.assert_allclose(table.fnr, expected)
    summary = pd.read_csv(ev / "conformal_summary.csv")
    assert summary.alpha[0] == 0.2 and np.isclose(summary.mean_fnr[0], np.mean(expected))
    assert f"conformal {name}: mean realised FNR" in proc.stdout

    # a missing mask: one message naming it, nothing written
    (out / f"{scores.case[0]}_conformal_{name}.png").unlink()
    proc = run(["nnunet-kaz", "evaluate", "--pred", str(out), "--gt", str(gt_dir), "--conformal", str(out), "-o",
                str(tmp_path / "eval2")], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and f"{scores.case[0]}_conformal_{name}.png" in proc.stderr
    assert not (tmp_path / "eval2").exists()
