"""SGDR schedule (paper 002 section III-C, standard SGDR formula) and snapshot bookkeeping."""
import math

import pytest
import torch

from nnunet_kaz.trainers.sgdr import SGDRScheduler, sgdr_cycle_ends, sgdr_lr
from nnunet_kaz.trainers.snapshots import Snapshot, SnapshotManifest


@pytest.mark.parametrize("t0,eta,epochs", [(5, 1, 20), (4, 2, 28), (3, 3, 39)])
def test_schedule_equals_torch_cosine_warm_restarts(t0, eta, epochs):
    ends = sgdr_cycle_ends(epochs, t0, eta)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=eta, eta_min=1e-4)
    for epoch in range(epochs):
        assert sgdr_lr(epoch, ends, 0.01, 1e-4) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()


def test_explicit_cycle_ends_follow_the_formula():
    ends = sgdr_cycle_ends(800, 100, 2, cycle_ends=(100, 200, 400, 800))
    assert ends == [100, 200, 400, 800]
    assert sgdr_lr(0, ends, 1e-2, 0) == pytest.approx(1e-2)
    assert sgdr_lr(100, ends, 1e-2, 0) == pytest.approx(1e-2)  # warm restart
    assert sgdr_lr(150, ends, 1e-2, 0) == pytest.approx(1e-2 / 2)  # half way through a 100-epoch cycle
    assert sgdr_lr(300, ends, 1e-2, 0) == pytest.approx(1e-2 / 2)  # half way through the 200-epoch cycle
    t = 799 - 400
    assert sgdr_lr(799, ends, 1e-2, 1e-5) == pytest.approx(1e-5 + (1e-2 - 1e-5) / 2 * (1 + math.cos(math.pi * t / 400)))


def test_scheduler_is_stepped_with_the_epoch_number():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = SGDRScheduler(opt, 1.0, 0.0, [4, 8])
    sched.step(6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert sched.get_last_lr() == [pytest.approx(0.5)]


@pytest.mark.parametrize("kwargs", [dict(num_epochs=25, t0=10, eta=1), dict(num_epochs=20, t0=4, eta=2),
                                    dict(num_epochs=10, t0=5, eta=1, cycle_ends=(5, 8)),
                                    dict(num_epochs=10, t0=5, eta=1, cycle_ends=(6, 4, 10))])
def test_cycles_that_do_not_fit_are_refused(kwargs):
    with pytest.raises(ValueError, match="num_epochs|increasing"):
        sgdr_cycle_ends(**kwargs)


def _manifest(k=2):
    return SnapshotManifest("T", [4, 8], top_k=k, window=3, lr_max=1.0, lr_min=0.0)


def test_top_k_per_cycle_keeps_the_best_and_evicts_the_worst():
    m = _manifest()
    assert m.offer(Snapshot(0, 1, 0.5, 0.1, "a"))[0]
    assert m.offer(Snapshot(0, 2, 0.7, 0.1, "b"))[0]
    kept, evicted = m.offer(Snapshot(0, 3, 0.6, 0.1, "c"))
    assert kept and [s.file for s in evicted] == ["a"]
    kept, evicted = m.offer(Snapshot(0, 3, 0.55, 0.1, "d"))
    assert not kept and not evicted
    assert m.offer(Snapshot(1, 6, 0.1, 0.1, "e"))[0]  # another cycle has its own top-k
    assert sorted(s.file for s in m.snapshots) == ["b", "c", "e"]
    assert m.best(0) == pytest.approx(0.7)


def test_manifest_round_trip_and_drop(tmp_path):
    m = _manifest()
    m.offer(Snapshot(0, 3, 0.8, 0.1, "x"))
    m.offer(Snapshot(1, 7, 0.2, 0.1, "y"))
    removed = m.drop_cycle(1)
    assert [s.file for s in removed] == ["y"]
    m.save(tmp_path / "snapshots.json")
    back = SnapshotManifest.load(tmp_path / "snapshots.json")
    assert back == m and back.dropped_cycles == [1]


def _paper_reference_lrs(lr_max=0.1, lr_min=1e-4):
    """torch's CosineAnnealingWarmRestarts for paper 002's restarts at 100, 200, 400, 800: a 100-epoch cycle,
    then T_0 = 100 doubling (T_mult = 2) from epoch 100."""
    lrs = []
    for start, stop, t0 in ((0, 100, 100), (100, 800, 100)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr_max)
        ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=2, eta_min=lr_min)
        for _ in range(start, stop):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
    return lrs


def test_paper_schedule_is_the_trainers_default_and_equals_torch():
    from nnunet_kaz.trainers.sgdr_trainer import (SGDRSnapshotMixin, XBoundNetTrainerSGDR,
                                                  XBoundNetTrainerSGDR_nnUNetLR, nnUNetTrainerSGDR,
                                                  nnUNetTrainerSGDR_nnUNetLR)

    for cls in (nnUNetTrainerSGDR, XBoundNetTrainerSGDR):
        assert (cls.sgdr_lr_max, cls.sgdr_lr_min, cls.sgdr_cycle_ends, cls.snapshot_top_k,
                cls.snapshot_drop_margin) == (0.1, 1e-4, (100, 200, 400, 800), 3, 0.0)
    for cls in (nnUNetTrainerSGDR_nnUNetLR, XBoundNetTrainerSGDR_nnUNetLR):
        assert (cls.sgdr_lr_max, cls.sgdr_lr_min) == (None, 1e-5)  # None: nnU-Net's initial_lr 1e-2
    ends = sgdr_cycle_ends(800, SGDRSnapshotMixin.sgdr_T0, SGDRSnapshotMixin.sgdr_eta,
                           SGDRSnapshotMixin.sgdr_cycle_ends)
    assert ends == [100, 200, 400, 800]
    ref = _paper_reference_lrs()
    ours = [sgdr_lr(e, ends, 0.1, 1e-4) for e in range(800)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert ours[0] == ours[100] == ours[200] == ours[400] == pytest.approx(0.1)
    assert ours[799] == pytest.approx(1e-4, rel=2e-2)  # one epoch before the end of a 400-epoch cycle
    # paper 002 Appendix A's T_0 = 100, T_mult = 2 by the formula T_i = T_0 * 2^i would end cycles at
    # 100, 300, 700, 1500: it cannot fit 800 epochs, hence the explicit ends
    with pytest.raises(ValueError, match="num_epochs"):
        sgdr_cycle_ends(800, 100, 2)


def _settings(**attrs):
    from nnunet_kaz.trainers.sgdr_trainer import SGDRSnapshotMixin

    cls = type("Sub", (SGDRSnapshotMixin,), attrs)
    obj = object.__new__(cls)
    obj.num_epochs = attrs.pop("num_epochs", 800)
    return obj


def test_t0_and_eta_next_to_the_default_cycle_ends_are_refused_naming_sgdr_cycle_ends():
    """Issue 14.9: T0 / eta are ignored while sgdr_cycle_ends is set, so the message names sgdr_cycle_ends."""
    with pytest.raises(ValueError, match=r"sgdr_T0 and sgdr_eta are set but ignored.*sgdr_cycle_ends = None"):
        _settings(sgdr_T0=5, sgdr_eta=3.0, num_epochs=20).check_sgdr_settings()
    with pytest.raises(ValueError, match="sgdr_T0 are set but ignored"):
        _settings(sgdr_T0=50).check_sgdr_settings()  # even when the cycle ends fit
    with pytest.raises(ValueError, match="change sgdr_cycle_ends") as err:
        _settings(num_epochs=20).check_sgdr_settings()
    assert "sgdr_T0 / sgdr_eta, or" not in str(err.value)
    # with sgdr_cycle_ends = None, T0 / eta are used; a misfit names them
    _settings(sgdr_T0=5, sgdr_eta=1.0, sgdr_cycle_ends=None, snapshot_window=3, num_epochs=20).check_sgdr_settings()
    with pytest.raises(ValueError, match="change num_epochs or sgdr_T0 / sgdr_eta"):
        _settings(sgdr_T0=5, sgdr_eta=2.0, sgdr_cycle_ends=None, num_epochs=20).check_sgdr_settings()
