"""`nnunet-kaz train-ensemble`: the seeds x folds grid as nnUNetv2_train commands."""
import pytest

from nnunet_kaz.cli import main
from nnunet_kaz.errors import KazError
from nnunet_kaz.trainers.ensemble import ensemble_commands, parse_range


def test_parse_range():
    assert parse_range("0-4") == [0, 1, 2, 3, 4]
    assert parse_range("3,1,1") == [1, 3]
    with pytest.raises(KazError):
        parse_range("4-2")


def test_dry_run_prints_one_command_per_seed_and_fold(capsys):
    assert main(["train-ensemble", "-d", "501", "-c", "2d", "--seeds", "0-1", "--folds", "0,2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"nnUNetv2_train 501 2d {f} -tr XBoundNetTrainer_seed{s} -p nnUNetPlans -device cuda"
                     for s in (0, 1) for f in (0, 2)]


def test_a_trainer_without_seed_variants_is_refused():
    with pytest.raises(KazError, match="XBoundNetTrainer_Adam_seed0"):
        ensemble_commands("501", "2d", "XBoundNetTrainer_Adam", [0], [0])
