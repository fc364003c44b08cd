"""The streaming predictor on real nnU-Net models trained by `nnUNetv2_train` on a tiny phantom."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nnunet_kaz.errors import KazError
from nnunet_kaz.inference import UncertaintyPredictor, parse_member
from tests.conftest import KAZ_ID, run

pytestmark = pytest.mark.integration

DROPOUT = "nnUNetTrainerDropout_p02_debug"
PLAIN = "nnUNetTrainer_debug"


def toy_calibrator(tiny_kaz, path, seed):
    """An over-confident toy fit saved to `path`: temperature > 1 softens the probabilities."""
    from nnunet_kaz.postprocessing import classes_from_labels, make_calibrator, save_calibrator

    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, 4000)
    y = (rng.uniform(size=4000) < 0.5 + (p - 0.5) * 0.3).astype(int)
    labels = json.loads((tiny_kaz.raw / "dataset.json").read_text())["labels"]
    cal = make_calibrator("temperature", classes_from_labels(labels)).fit(np.stack([1 - p, p], 1), y)
    save_calibrator(cal, path)
    return cal


@pytest.fixture(scope="module")
def models(tiny_kaz):
    return {name: tiny_kaz.train(name) for name in (DROPOUT, PLAIN)}


def test_one_member_equals_stock_nnunet_predict_mirrored_by_default_and_with_disable_tta(tiny_kaz, models, tmp_path):
    """`predict` mirrors as `nnUNetv2_predict` does unless `--disable-tta` (nnU-Net's `--disable_tta`); both
    routes equal stock nnU-Net's; `--mirror` (the old switch) still parses, warns and changes nothing; the
    library's default is the command's; predict_args.json records which."""
    images = tiny_kaz.raw / "imagesTs"
    probs = {}
    for name, stock_flags, our_flags in (("mirrored", [], []), ("plain", ["--disable_tta"], ["--disable-tta"])):
        stock, ours = tmp_path / f"stock_{name}", tmp_path / f"ours_{name}"
        run(["nnUNetv2_predict", "-i", str(images), "-o", str(stock), "-d", str(KAZ_ID), "-c", "2d", "-f", "0",
             "-tr", DROPOUT, "-p", "nnUNetTinyPlans", "-device", "cpu", "-npp", "1", "-nps", "1",
             "--save_probabilities", *stock_flags], tiny_kaz.env)
        run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(ours), "-m", f"{models[DROPOUT]}:0",
             "-device", "cpu", *our_flags], tiny_kaz.env)
        assert json.loads((ours / "predict_args.json").read_text())["mirror"] is (name == "mirrored")
        npz = sorted(stock.glob("*.npz"))
        assert len(npz) == 3
        foreground = 0  # over the three cases: a 6-iteration model may predict none in one of them
        for f in npz:
            a = np.load(f)["probabilities"]
            b = np.load(ours / f.name)["probabilities"]
            assert a.shape == b.shape
            assert np.abs(a - b).max() < 1e-4
            probs[name, f.name] = b
            seg_stock = np.asarray(Image.open(stock / f.name.replace(".npz", ".png")))
            seg_ours = np.asarray(Image.open(ours / f.name.replace(".npz", ".png")))
            assert seg_ours.shape == seg_stock.shape
            foreground += int(np.count_nonzero(seg_stock))
            # identical wherever the decision is not a float16 tie (|p1 - p0| below the probabilities' tolerance)
            differ = seg_ours != seg_stock
            assert not differ[np.abs(a[1] - a[0])[0] > 2e-4].any() and differ.sum() <= 2
        assert foreground > 0  # the segmentations compared are not all background
    # mirroring changes the probabilities (so the two comparisons above test different things)
    assert max(np.abs(probs["mirrored", f] - probs["plain", f]).max() for _, f in probs) > 1e-3
    old = run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(tmp_path / "old"), "-m", f"{models[DROPOUT]}:0",
               "-device", "cpu", "--mirror"], tiny_kaz.env)
    assert "warning: --mirror is no longer needed" in old.stderr
    for _, f in probs:
        assert np.array_equal(np.load(tmp_path / "old" / f)["probabilities"], probs["mirrored", f])
    import inspect

    assert inspect.signature(UncertaintyPredictor).parameters["mirror"].default is True


def test_mc_dropout_samples_disagree_and_identical_members_do_not(tiny_kaz, models, tmp_path):
    images = tiny_kaz.raw / "imagesTs"
    # the same checkpoint twice, no dropout: every sample is identical
    twice = UncertaintyPredictor([parse_member(f"{models[PLAIN]}:0"), parse_member(f"{models[PLAIN]}:0")],
                                 device="cpu", verbose=False)
    scores = twice.predict_folder(images, tmp_path / "twice")
    unc = np.load(tmp_path / "twice" / f"{scores.case[0]}_uncertainty.npz")
    assert np.abs(unc["mutual_information"]).max() < 1e-5
    assert np.abs(unc["variance"]).max() < 1e-7
    assert (scores.n_members == 2).all() and (scores.n_samples == 2).all()

    mc = UncertaintyPredictor([parse_member(f"{models[DROPOUT]}:0")], mc=6, mc_batch=4, device="cpu",
                              verbose=False)
    scores = mc.predict_folder(images, tmp_path / "mc")
    unc = np.load(tmp_path / "mc" / f"{scores.case[0]}_uncertainty.npz")
    assert unc["variance"].max() > 1e-6 and unc["mutual_information"].max() > 1e-4
    assert (scores.n_samples == 6).all()
    assert list(pd.read_csv(tmp_path / "mc" / "scores.csv").columns) == [
        "case", "label", "mean_entropy", "relunet_score", "relunet_score_eq9", "relunet_score_cross", "cv",
        "pairwise_dice", "pairwise_dice_pooled", "labelled_uncertainty", "n_members", "n_samples"]
    # reproducible: the same seed gives the same MC outputs (what lets an interrupted run resume exactly)
    again = UncertaintyPredictor([parse_member(f"{models[DROPOUT]}:0")], mc=6, mc_batch=4, device="cpu",
                                 verbose=False)
    stem = tmp_path / "again" / scores.case[0]
    image_files = [str(tiny_kaz.raw / "imagesTs" / f"{scores.case[0]}_0000.png")]
    stem.parent.mkdir()
    result = again.predict_case(image_files, stem)
    first = np.load(tmp_path / "mc" / f"{scores.case[0]}.npz")["probabilities"]
    np.testing.assert_array_equal(result["probabilities"], first)
    other_seed = UncertaintyPredictor([parse_member(f"{models[DROPOUT]}:0")], mc=6, mc_batch=4, device="cpu",
                                      seed=1, verbose=False)
    assert not np.array_equal(other_seed.predict_case(image_files, stem)["probabilities"], first)


def test_overwrite_redoes_finished_cases_and_a_plain_rerun_keeps_them(tiny_kaz, models, tmp_path):
    images = tiny_kaz.raw / "imagesTs"
    out = tmp_path / "out"
    cmd = ["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", f"{models[DROPOUT]}:0", "-device",
           "cpu", "--mc", "2"]
    run(cmd, tiny_kaz.env)
    case = sorted(p.name[: -len("_scores.json")] for p in out.glob("*_scores.json"))[0]
    good = {n: (out / n).read_bytes() for n in (f"{case}.png", f"{case}.npz", f"{case}_scores.json")}
    # tamper with a finished case: a plain rerun must keep it (it is finished), --overwrite must redo it
    Image.fromarray(np.zeros_like(np.asarray(Image.open(out / f"{case}.png")))).save(out / f"{case}.png")
    np.savez_compressed(out / f"{case}.npz", probabilities=np.zeros((2, 1, 2, 2), np.float32))
    (out / f"{case}_scores.json").write_text("[]")
    tampered = {n: (out / n).read_bytes() for n in good}
    proc = run(cmd, tiny_kaz.env)
    assert "3 case(s) already predicted" in proc.stdout
    assert {n: (out / n).read_bytes() for n in good} == tampered
    proc = run([*cmd, "--overwrite"], tiny_kaz.env)
    assert "already predicted" not in proc.stdout
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{case}.png")),
                                  np.asarray(Image.open(__import__("io").BytesIO(good[f"{case}.png"]))))
    np.testing.assert_array_equal(np.load(out / f"{case}.npz")["probabilities"],
                                  np.load(__import__("io").BytesIO(good[f"{case}.npz"]))["probabilities"])
    assert json.loads((out / f"{case}_scores.json").read_text()) == json.loads(good[f"{case}_scores.json"])
    assert len(pd.read_csv(out / "scores.csv")) == 3


def test_rgb_png_for_a_one_channel_dataset_is_refused_before_anything_is_written(tiny_kaz, models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    grey = np.asarray(Image.open(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]))
    Image.fromarray(np.stack([grey] * 3, -1)).save(images / "RGB_0000.png")
    out = tmp_path / "out"
    proc = run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", f"{models[PLAIN]}:0",
                "-device", "cpu"], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("nnunet-kaz predict: error:") == 1
    assert "RGB" in proc.stderr and "3 channel(s)" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_mc_variance_and_mutual_information_match_the_seeded_samples(tiny_kaz, models, tmp_path, monkeypatch):
    """Reference: numpy on the very samples the predictor streamed (captured as StreamingStats receives them,
    the probabilities of its logits made whole here):
    population variance per class, MI = H(mean) - mean_s H(p_s) with the normalised binary entropy."""
    import nnunet_kaz.inference.predictor as predictor_module
    from nnunet_kaz.uncertainty.streaming import StreamingStats

    captured = []

    class Recording(StreamingStats):
        def batch(self, b, nonlin):  # the predictor's route: the stitched logits' slabs, probabilities made per slab
            sink, parts = super().batch(b, nonlin), []
            slab, end = sink.slab, sink.end

            def recording_slab(rows, values):
                parts.append(nonlin(values).detach().double().cpu().numpy())
                slab(rows, values)

            def recording_end():
                captured.append(np.concatenate(parts, axis=2))
                end()

            sink.slab, sink.end = recording_slab, recording_end
            return sink

    monkeypatch.setattr(predictor_module, "StreamingStats", Recording)
    members = [parse_member(f"{models[DROPOUT]}:0"), parse_member(f"{models[DROPOUT]}:0")]
    predictor = UncertaintyPredictor(members, mc=3, mc_batch=2, device="cpu", verbose=False)
    image = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    data, props = predictor.preprocess([str(image)])
    stats = predictor.sample_case(data, "case")
    samples = np.concatenate(captured)  # (2 models x 3 samples, C, *spatial)
    assert samples.shape[0] == 6 and not np.allclose(samples[0], samples[1])

    def h(p):  # normalised binary entropy (paper 000 eq. 2), in float64
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)

    var = samples.var(0)
    assert var.max() > 1e-4
    np.testing.assert_allclose(stats.variance, var, rtol=1e-3, atol=1e-6)
    mi = h(samples.mean(0)[1]) - h(samples[:, 1]).mean(0)
    np.testing.assert_allclose(h(stats.mean[1].astype(np.float64)) - stats.sample_entropy(), mi, atol=1e-5)
    # and the files: predict_case writes exactly these maps in the input geometry
    result = predictor.finalize(stats, props)
    from nnunet_kaz.inference.export import GeometryRestorer

    geo = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props)
    np.testing.assert_allclose(result["variance"], geo.maps(var.astype(np.float32)), rtol=1e-3, atol=1e-6)
    ref_mi = np.clip(h(geo.probabilities(samples.mean(0).astype(np.float32), False)[1].astype(np.float64))
                     - geo.maps(h(samples[:, 1]).mean(0)[None].astype(np.float32))[0], 0, None)
    np.testing.assert_allclose(result["mutual_information"], ref_mi, atol=1e-5)
    assert result["mutual_information"].max() > 1e-3


def test_uncertainty_comes_from_the_uncalibrated_samples(tiny_kaz, models, tmp_path):
    """Issue 13: calibration changes only the probabilities and the segmentation; entropy, MI, variance and the
    scores are those of the uncalibrated run; --calibrated-entropy adds its own, named map."""
    from nnunet_kaz.postprocessing import apply_calibration
    from nnunet_kaz.uncertainty import normalized_entropy

    cal = toy_calibrator(tiny_kaz, tmp_path / "calib.json", 1)
    images = tiny_kaz.raw / "imagesTs"
    base = ["nnunet-kaz", "predict", "-i", str(images), "-m", f"{models[DROPOUT]}:0", "-device", "cpu", "--mc", "3"]
    run([*base, "-o", str(tmp_path / "raw")], tiny_kaz.env)
    run([*base, "-o", str(tmp_path / "cal"), "--calibration", str(tmp_path / "calib.json"), "--calibrated-entropy"],
        tiny_kaz.env)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "raw" / "scores.csv"),
                                  pd.read_csv(tmp_path / "cal" / "scores.csv"))
    for f in sorted((tmp_path / "raw").glob("*_uncertainty.npz")):
        raw, cald = np.load(f), np.load(tmp_path / "cal" / f.name)
        assert raw["mutual_information"].max() > 1e-3
        for key in ("entropy", "mutual_information", "variance"):
            np.testing.assert_array_equal(raw[key], cald[key], err_msg=key)
        probs = np.load(tmp_path / "cal" / f.name.replace("_uncertainty", ""))["probabilities"]
        raw_probs = np.load(f.parent / f.name.replace("_uncertainty", ""))["probabilities"]
        np.testing.assert_allclose(probs, apply_calibration(raw_probs, cal), atol=1e-6)
        np.testing.assert_allclose(cald["calibrated_entropy"], normalized_entropy(probs), atol=1e-6)
        assert not np.allclose(cald["calibrated_entropy"], cald["entropy"])
        assert (tmp_path / "cal" / f.name.replace("_uncertainty.npz", "_calibrated_entropy.png")).is_file()
        assert "calibrated_entropy" not in raw.files
    # issue 22: evaluate's threshold analysis reads CASE_uncertainty.npz next to the predictions, so its table is
    # the same with and without --calibration (temperature scaling keeps the argmax: the segmentations are equal)
    from nnunet_kaz.cli import main

    tables = {}
    for run_name in ("raw", "cal"):
        for extra in ([], ["--probs-entropy"]):
            out = tmp_path / f"eval_{run_name}{'_pe' if extra else ''}"
            assert main(["evaluate", "--pred", str(tmp_path / run_name), "--gt", str(tiny_kaz.raw / "labelsTs"),
                         "--probs", str(tmp_path / run_name), *extra, "--figure-cases", "0", "-q", "-o",
                         str(out)]) == 0
            tables[run_name, bool(extra)] = pd.read_csv(out / "uncertainty_thresholds.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "eval_raw" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "eval_cal" / "metrics.csv"))  # the same segmentations
    assert (tables["raw", False]["uncertain"] > 0).any()
    pd.testing.assert_frame_equal(tables["raw", False], tables["cal", False])
    # the entropy of the (calibrated) probabilities, asked for by name, would have changed the table
    assert not tables["raw", True].equals(tables["cal", True])


def test_rerun_after_a_partial_run_predicts_only_the_missing_cases(tiny_kaz, models, tmp_path):
    images = tiny_kaz.raw / "imagesTs"
    out = tmp_path / "out"
    member = f"{models[PLAIN]}:0"
    run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", member, "-device", "cpu",
         "--num-parts", "2", "--part-id", "0"], tiny_kaz.env)
    first_part = sorted(out.glob("KAZ_*_scores.json"))
    assert len(first_part) == 2  # cases 0 and 2 of 3
    proc = run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", member, "-device", "cpu"],
               tiny_kaz.env)
    assert "2 case(s) already predicted" in proc.stdout
    assert len(pd.read_csv(out / "scores.csv")) == 3
    assert not list(out.glob(".*part*"))  # no temporary files left


def test_bad_members_give_clear_errors(tiny_kaz, models, tmp_path):
    with pytest.raises(KazError, match="missing checkpoint"):
        parse_member(f"{models[PLAIN]}:0:best,checkpoint_nope.pth")
    with pytest.raises(KazError, match="fold folder"):
        parse_member(f"{models[PLAIN]}:7")
    with pytest.raises(KazError, match="no dropout"):
        UncertaintyPredictor([parse_member(f"{models[PLAIN]}:0")], mc=3, device="cpu")
    with pytest.raises(KazError, match=r"\(mc_batch\)") as e:  # the library names its parameter, not a flag
        UncertaintyPredictor([parse_member(f"{models[PLAIN]}:0")], mc_batch=0, device="cpu")
    assert "--" not in str(e.value)
    proc = run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(tmp_path / "o"), "-m",
                f"{models[PLAIN]}:0", "-device", "cpu", "--mc-batch", "0"], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and "(--mc-batch)" in proc.stderr and not (tmp_path / "o").exists()
    # a member trained on another label set
    other = tmp_path / "other"
    shutil.copytree(models[PLAIN], other / models[PLAIN].name)
    dj = json.loads((other / models[PLAIN].name / "dataset.json").read_text())
    dj["labels"]["cyst"] = 2
    (other / models[PLAIN].name / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(KazError, match="labels"):
        UncertaintyPredictor([parse_member(f"{models[PLAIN]}:0"), parse_member(f"{other / models[PLAIN].name}:0")],
                             device="cpu")
    # a truncated checkpoint
    broken = tmp_path / "broken" / models[PLAIN].name
    shutil.copytree(models[PLAIN], broken)
    ckpt = broken / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(tmp_path / "o"), "-m",
                f"{broken}:0", "-device", "cpu"], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr and str(ckpt) in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unreadable_image_is_named_and_nothing_half_written(tiny_kaz, models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "BAD_0000.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", f"{models[PLAIN]}:0",
                "-device", "cpu"], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and "BAD_0000.png" in proc.stderr
    assert not list(out.glob("BAD*"))


def test_calibration_and_postprocessing_chain_are_applied(tiny_kaz, models, tmp_path):
    from nnunet_kaz.postprocessing import PostprocessingChain, Resize, apply_calibration

    images = tiny_kaz.raw / "imagesTs"
    plain = tmp_path / "plain"
    run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(plain), "-m", f"{models[PLAIN]}:0", "-device",
         "cpu"], tiny_kaz.env)
    cal = toy_calibrator(tiny_kaz, tmp_path / "calib.json", 0)
    chain = PostprocessingChain.paper000(size=[40, 48], threshold=0.4, radius_mm=1.0)
    chain.save(tmp_path / "chain.json")
    out = tmp_path / "post"
    run(["nnunet-kaz", "predict", "-i", str(images), "-o", str(out), "-m", f"{models[PLAIN]}:0", "-device", "cpu",
         "--calibration", str(tmp_path / "calib.json"), "--postprocessing", str(tmp_path / "chain.json")],
        tiny_kaz.env)
    for f in sorted(plain.glob("KAZ_*[0-9].npz")):
        raw = np.load(f)["probabilities"]
        calibrated = np.load(out / f.name)["probabilities"]
        np.testing.assert_allclose(calibrated, apply_calibration(raw, cal), atol=1e-6)
        assert not np.allclose(calibrated, raw)
        seg = np.asarray(Image.open(out / f.name.replace(".npz", ".png")))
        # in the input geometry: the chain without its resize step (that one makes the KAZ export)
        in_geometry = PostprocessingChain([st for st in chain.steps if not isinstance(st, Resize)])
        expected = in_geometry.apply(calibrated, spacing=[999.0, 1.0, 1.0]).segmentation
        np.testing.assert_array_equal(seg, expected[0])
        bmp = np.asarray(Image.open(out / "kaz_export" / f.name.replace(".npz", ".bmp")))
        assert bmp.shape == (40, 48) and set(np.unique(bmp)) <= {0, 255}
        export = chain.apply(calibrated, spacing=[999.0, 1.0, 1.0]).segmentation
        np.testing.assert_array_equal(bmp > 0, export.reshape(bmp.shape) > 0)
    assert PostprocessingChain.load(out / "postprocessing.json") == chain


def test_batched_mc_samples_are_independent_samples(tiny_kaz, models):
    """A batch of MC samples must behave like samples drawn one at a time: per-sample softmax, independent
    masks (a softmax over samples and classes together once shrank the variance ~40x)."""
    import torch

    image = [str(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0])]
    member = parse_member(f"{models[DROPOUT]}:0")
    assert UncertaintyPredictor([member], device="cpu", verbose=False).mc_batch == 1  # the CLI's CPU default
    batched = UncertaintyPredictor([member], mc=12, mc_batch=6, device="cpu", verbose=False)
    logits = torch.randn(3, 2, 1, 5, 5)
    probs = batched.probabilities(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 1, 5, 5))
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], 0))
    data, _ = batched.preprocess(image)
    var_batched = batched.sample_case(data, "a").variance[1].mean()
    one_by_one = UncertaintyPredictor([member], mc=12, mc_batch=1, device="cpu", verbose=False, seed=5)
    var_single = one_by_one.sample_case(data, "a").variance[1].mean()
    assert 0.5 < var_batched / var_single < 2.0
