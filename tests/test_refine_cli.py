"""`nnunet-kaz refine fit / apply` (ERNet heatmap-guided refinement, paper 001) on a real trained member."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nnunet_kaz.cli import main
from nnunet_kaz.evaluation import overlap_metrics
from tests.conftest import run

pytestmark = pytest.mark.integration
# The demo schedule (10 x 12 iterations, ~20 s): the 6-iteration debug member segments nothing in particular, so
# its largest component can fill the 32x32 image and no ROI is a proper sub-box (CI saw this).
MEMBER = "XBoundNetTrainer_demo_seed0"  # seeded: the same member on every run


@pytest.fixture(scope="module")
def fitted(tiny_kaz, tmp_path_factory):
    """A refiner fitted on the phantom's training cases (largest-component ROI, so the ROI is a proper box)."""
    member = tiny_kaz.train(MEMBER)
    out = tmp_path_factory.mktemp("refine") / "refiner.json"
    run(["nnunet-kaz", "refine", "fit", "-m", f"{member}:0", "-i", str(tiny_kaz.raw / "imagesTr"), "--gt",
         str(tiny_kaz.raw / "labelsTr"), "-o", str(out), "--margin", "2", "--roi", "largest", "--iterations",
         "300", "--gradients", "mean"], tiny_kaz.env)  # Algorithm 3's summed gradients diverge on these ROIs
    return member, out


def _last_stage(member) -> str:
    """The last decoder stage of the member's network, as the network names it (the planned depth decides)."""
    from nnunet_kaz.inference import load_member

    _, net = load_member(f"{member}:0", "cpu")
    return f"decoder.stages.{len(net.decoder.stages) - 1}"


def test_fit_writes_refiner_with_feature_layout(fitted):
    member, path = fitted
    d = json.loads(path.read_text())
    assert d["format"] == "nnunet_kaz.heatmap_refiner" and np.shape(d["W"]) == (5, 2)
    f = d["features"]
    assert f["layout"] == ["probability", "heatmap_weight"] and f["block"] == _last_stage(member)
    assert f["margin"] == 2 and f["roi"] == "largest" and f["target_class"] == 1
    assert d["fit"]["n_voxels"] == sum(c["roi_voxels"] for c in d["fit"]["cases"]) > 0
    assert d["fit"]["final_loss"] < d["fit"]["initial_loss"]
    assert d["member"]["trainer"] == MEMBER
    assert d["hyperparameters"] == {"n_hidden": 5, "learning_rate": 0.5, "iterations": 300, "reduction": "mean",
                                    "seed": 0, "max_voxels": 200000}


def test_fit_by_algorithm_3_stops_with_a_clear_error_when_it_diverges(tiny_kaz, fitted, tmp_path, capsys):
    """The default is Algorithm 3 verbatim (lr 0.01 on gradients summed over the ROI voxels): on the pooled ROIs
    of the training slices (hundreds of voxels) its step diverges, and the command says so naming the flag of
    the faster variant, writing nothing."""
    member, refiner = fitted
    n_voxels = json.loads(refiner.read_text())["fit"]["n_voxels"]
    assert 0.01 * n_voxels > 2  # the summed step is beyond what gradient descent on this loss tolerates
    out = tmp_path / "r.json"
    assert main(["refine", "fit", "-m", f"{member}:0", "-i", str(tiny_kaz.raw / "imagesTr"), "--gt",
                 str(tiny_kaz.raw / "labelsTr"), "-o", str(out), "--margin", "2", "--roi", "largest"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "(--gradients)" in err[0]
    err = err[0]
    assert err.startswith("nnunet-kaz refine") and "error: Algorithm 3's gradient descent" in err
    assert f"summed over {n_voxels} voxels" in err and not out.exists()


def test_apply_changes_only_roi_voxels_and_reports_the_effect(tiny_kaz, fitted, tmp_path, capsys):
    member, refiner = fitted
    images, gt = tiny_kaz.raw / "imagesTs", tiny_kaz.raw / "labelsTs"
    out = tmp_path / "refined"
    proc = run(["nnunet-kaz", "refine", "apply", "-m", f"{member}:0", "-i", str(images), "--refiner", str(refiner),
                "-o", str(out), "--gt", str(gt)], tiny_kaz.env)
    assert "dice_before" in proc.stdout and "mean" in proc.stdout
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "plain"), "-m", f"{member}:0",
                 "--disable-tta"]) == 0  # refine predicts without nnU-Net's mirroring
    capsys.readouterr()
    table = pd.read_csv(out / "refinement_effect.csv")
    assert list(table.columns) == ["case", "dice_before", "dice_after", "hd95_before", "hd95_after", "roi_voxels",
                                   "changed_voxels"]
    cases = sorted(p.name[:-len("_0000.png")] for p in images.glob("*_0000.png"))
    assert table["case"].tolist() == cases + ["mean"]
    assert table.iloc[-1]["dice_before"] == pytest.approx(table.iloc[:-1]["dice_before"].mean())
    proper = 0
    for i, case in enumerate(cases):
        refined = np.asarray(Image.open(out / f"{case}.png"))
        plain = np.asarray(Image.open(tmp_path / "plain" / f"{case}.png"))
        stored = np.load(out / f"{case}.npz")
        roi = tuple(slice(a, b) for a, b in stored["roi"])
        inside = np.zeros((1, 32, 32), bool)
        inside[roi] = True
        proper += int(not inside.all())
        # outside the ROI: the unrefined prediction of `nnunet-kaz predict`, label and probabilities bit for bit
        assert np.array_equal(refined[~inside[0]], plain[~inside[0]])
        before = np.load(tmp_path / "plain" / f"{case}.npz")["probabilities"]
        assert np.array_equal(stored["probabilities"][:, ~inside], before[:, ~inside])
        assert np.allclose(stored["probabilities"].sum(0), 1, atol=1e-5)
        assert table.loc[i, "changed_voxels"] == np.count_nonzero(refined != plain)
        assert table.loc[i, "roi_voxels"] == inside.sum()
        label = np.asarray(Image.open(gt / f"{case}.png")) == 1
        assert table.loc[i, "dice_before"] == pytest.approx(overlap_metrics(plain == 1, label)["dice"])
        assert table.loc[i, "dice_after"] == pytest.approx(overlap_metrics(refined == 1, label)["dice"])
    assert proper > 0  # at least one ROI is a proper sub-box, so "unchanged outside" was really tested


def test_apply_rejects_missing_and_foreign_refiners_without_writing(tiny_kaz, fitted, tmp_path, capsys):
    member, refiner = fitted
    images = tiny_kaz.raw / "imagesTs"
    out = tmp_path / "o"
    base = ["refine", "apply", "-m", f"{member}:0", "-i", str(images), "-o", str(out), "--refiner"]
    assert main([*base, str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    d = json.loads(refiner.read_text())
    d["features"]["layout"] = ["probability", "heatmap_weight", "distance"]
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(d))
    assert main([*base, str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "foreign.json" in err and "distance" in err and "refit" in err
    d = json.loads(refiner.read_text())
    d["features"]["block"] = "decoder.stages.9"
    other_net = tmp_path / "other_net.json"
    other_net.write_text(json.dumps(d))
    assert main([*base, str(other_net)]) == 2
    err = capsys.readouterr().err
    assert "decoder.stages.9" in err and _last_stage(member) in err  # names the valid blocks
    d = json.loads(refiner.read_text())
    del d["features"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(d))
    assert main([*base, str(bare)]) == 2
    assert "refine fit" in capsys.readouterr().err
    assert main(["refine", "apply", "-m", f"{member}:0", "-i", str(images), "-o", str(out), "--refiner",
                 str(refiner), "--gt", str(tmp_path / "no_labels")]) == 2
    assert "no_labels" in capsys.readouterr().err
    small = tmp_path / "small_labels"  # ground truth of another size than the images
    small.mkdir()
    for label in (tiny_kaz.raw / "labelsTs").glob("*.png"):
        Image.fromarray(np.asarray(Image.open(label))[:16, :16]).save(small / label.name)
    assert main(["refine", "apply", "-m", f"{member}:0", "-i", str(images), "-o", str(out), "--refiner",
                 str(refiner), "--gt", str(small)]) == 2
    assert "differ in size" in capsys.readouterr().err
    assert not out.exists()


def test_fit_rejects_missing_labels_without_writing(tiny_kaz, tmp_path, capsys):
    member = tiny_kaz.train(MEMBER)
    labels = tmp_path / "labels"
    labels.mkdir()
    one = sorted((tiny_kaz.raw / "labelsTr").glob("*.png"))[0]
    (labels / one.name).write_bytes(one.read_bytes())
    out = tmp_path / "r.json"
    assert main(["refine", "fit", "-m", f"{member}:0", "-i", str(tiny_kaz.raw / "imagesTr"), "-l", str(labels),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "warning: -l is the old spelling of --gt" in err  # still accepted in this release
    assert "missing label file" in err and "KAZ_P001_a060.png" in err
    assert not out.exists()


def test_refined_probabilities_keep_other_classes_proportions_and_the_outside():
    from nnunet_kaz.explain.refine_cli import CaseMaps, refine_probabilities
    from nnunet_kaz.explain.refinement import HeatmapRefiner

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=(1, 12, 10)).transpose(3, 0, 1, 2).astype(np.float32)  # (3, 1, 12, 10)
    probs[2] *= 0.1  # class 2 nowhere the argmax ...
    probs /= probs.sum(0)
    probs[:, 0, 4:7, 3:6] = np.array([0.1, 0.2, 0.7])[:, None, None]  # ... but in a small blob
    probs[:, 0, 11, 9] = [0.1, 0.1, 0.8]  # and one stray voxel, outside the largest component's box
    heat = rng.random((1, 12, 10))
    m = CaseMaps(probs, heat, target_class=2, margin=1, props={}, roi="largest")
    assert m.roi == (slice(0, 1), slice(3, 8), slice(2, 7))
    r = HeatmapRefiner(n_hidden=5)
    r.W, r.B, r.w, r.b = np.zeros((5, 2)), np.zeros((5, 1)), np.zeros((1, 5)), np.full((1, 1), 0.25)  # p_new = 0.25
    refined, seg = refine_probabilities(r, m, 2)
    inside = np.zeros(probs.shape[1:], bool)
    inside[m.roi] = True
    assert np.array_equal(refined[:, ~inside], probs[:, ~inside]) and np.array_equal(seg[~inside], m.seg[~inside])
    assert np.allclose(refined[2][inside], 0.25) and np.allclose(refined.sum(0), 1, atol=1e-6)
    old = probs[:, inside]
    ratio = refined[0][inside] / refined[1][inside]
    assert np.allclose(ratio, old[0] / old[1], rtol=1e-5)  # the other classes keep their proportions
    assert np.array_equal(seg[inside], refined[:, inside].argmax(0))
