"""`nnunet-kaz explain` on a real trained XBoundNet++ member."""
import numpy as np
import pytest

from tests.conftest import run

pytestmark = pytest.mark.integration


def test_explain_writes_grid_and_maps_for_every_block(tiny_kaz, tmp_path):
    member = tiny_kaz.train("XBoundNetTrainer_debug")
    image = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    out = tmp_path / "explain"
    run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{member}:0", "-o", str(out), "--target", "gt",
         "--gt", str(tiny_kaz.raw / "labelsTs")], tiny_kaz.env)
    case = image.name[: -len("_0000.png")]
    assert (out / f"{case}_gradcam.png").stat().st_size > 10_000
    maps = np.load(out / f"{case}_gradcam.npz")
    names = list(maps.keys())
    assert "encoder.stages.0" in names and "bridge" in names  # the stem is encoder stage 0
    assert any(n.startswith("decoder") for n in names)
    for n in names:
        assert maps[n].shape == (1, 32, 32) and (maps[n] >= 0).all()


def test_explain_rejects_unknown_layers_and_lists_valid_ones(tiny_kaz, tmp_path):
    member = tiny_kaz.train("XBoundNetTrainer_debug")
    image = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    proc = run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{member}:0", "-o", str(tmp_path / "o"),
                "--layers", "no.such.block"], tiny_kaz.env, check=False)
    assert proc.returncode == 2 and "no.such.block" in proc.stderr and "bridge" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_rgb_image_for_a_one_channel_dataset_is_refused_before_anything_is_written(tiny_kaz, tmp_path):
    from PIL import Image

    member = tiny_kaz.train("XBoundNetTrainer_debug")
    grey = np.asarray(Image.open(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]))
    image = tmp_path / "RGB_0000.png"
    Image.fromarray(np.stack([grey] * 3, -1)).save(image)
    proc = run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{member}:0", "-o", str(tmp_path / "o")],
               tiny_kaz.env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("nnunet-kaz explain: error:") == 1
    assert "case RGB" in proc.stderr and "3 channel(s)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
