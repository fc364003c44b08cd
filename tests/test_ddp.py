"""Every trainer's network trains under DistributedDataParallel (gloo, one process on the CPU).

nnU-Net wraps the network in DDP without `find_unused_parameters`, so a parameter that gets no gradient (e.g. the
wrapped decoder's segmentation layers under MHEX+ heads) ends the second iteration with "Expected to have finished
reduction in the prior iteration". Every exported trainer is built from the same plans, so a new trainer whose
network leaves a parameter out fails here.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import nnunet_kaz.trainers as trainers
from tests.conftest import KAZ


def _trainer_classes() -> list[type]:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    out = []
    for name in sorted(dir(trainers)):
        obj = getattr(trainers, name)
        if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj is not nnUNetTrainer:
            out.append(obj)
    return out


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_trainer_network_trains_two_steps_under_ddp(tiny_kaz, gloo):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(tiny_kaz.root / "nnUNet_preprocessed" / KAZ / "nnUNetTinyPlans.json"))
    cm = pm.get_configuration("2d")
    classes = _trainer_classes()
    names = {c.__name__ for c in classes}
    assert {"XBoundNetTrainerMHEX", "nnUNetTrainerMHEX", "XBoundNetTrainer", "nnUNetTrainerSGDR"} <= names
    seen, failures = set(), []
    for cls in classes:
        torch.manual_seed(0)
        net = cls.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=True)
        signature = (type(net).__name__, str(net))
        if signature in seen:  # variants that only change the schedule build the same network
            continue
        seen.add(signature)
        model = DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(2, 1, *cm.patch_size)
        try:
            for _ in range(2):
                opt.zero_grad()
                out = model(x)
                loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
                loss.backward()
                opt.step()
        except RuntimeError as e:
            failures.append(f"{cls.__name__}: {str(e).splitlines()[0]}")
            continue
        missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            failures.append(f"{cls.__name__}: no gradient for {missing[:4]}")
    assert len(seen) >= 4
    assert not failures, "\n".join(failures)


def test_mhex_drops_the_unused_seg_layers_and_loads_old_checkpoints():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_kaz.networks import MHEXPlus

    def build():
        torch.manual_seed(0)
        return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv2d, 3, [1, 2, 2], 1, 2, 1, conv_bias=True,
                             norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU, deep_supervision=True)

    old_style = dict(build().state_dict())  # the wrapped network's own weights, seg_layers included
    model = MHEXPlus(build())
    assert not any("seg_layers" in n for n, _ in model.named_parameters())
    state = {f"network.{k}": v for k, v in old_style.items()}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("heads.")})
    model.load_state_dict(state)  # strict: extra seg_layers keys of an older checkpoint are ignored
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("heads.")})
