"""Every trainer's network trains under DistributedDataParallel (gloo, one process on the CPU), and under two
gloo processes every rank draws its own augmentation and dropout streams (issue 23.5).

nnU-Net wraps the network in DDP without `find_unused_parameters`, so a parameter that gets no gradient (e.g. the
wrapped decoder's segmentation layers under MHEX+ heads) ends the second iteration with "Expected to have finished
reduction in the prior iteration". Every exported trainer is built from the same plans, so a new trainer whose
network leaves a parameter out fails here.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
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


# --- issue 23.5: every rank its own stream, no stream shared across seeds ----------------------------------------
DDP_TRAINERS = ("XBoundNetTrainerMHEX_debug", "XBoundNetTrainer_debug")


def test_rank_seeds_are_distinct_across_seeds_and_ranks():
    """rank_seed(seed, 0) is the seed (a single-process run keeps its stream); over seeds 0-999 and ranks 0-7 no two
    (seed, rank) pairs share a seed, unlike seed + rank, where rank 1 of seed s is rank 0 of seed s + 1."""
    from nnunet_kaz.trainers.seeding import rank_seed

    seeds = {(s, r): rank_seed(s, r) for s in range(1000) for r in range(8)}
    assert all(rank_seed(s, 0) == s for s in range(1000))
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2 ** 32 for v in seeds.values())
    assert rank_seed(0, 1) != rank_seed(1, 0)


def _cpu_ddp(module, device_ids=None, **kwargs):
    """nnU-Net wraps its network with device_ids=[local_rank], which torch accepts for CUDA modules only; on the
    CPU (gloo) device_ids must be None. Everything else is nnU-Net's initialize."""
    return DistributedDataParallel(module, **kwargs)


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    """One gloo rank (run as its own process by the test): for each trainer of DDP_TRAINERS and seeds 0 and 1, the
    real nnU-Net trainer is built, initialised under DDP on the CPU and trains two steps; written to `out`: the
    streams right after seeding (torch's seed, numpy's and random's state), the two augmented batches and the
    dropout masks of the two steps, as digests."""
    import json
    import random

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    import nnunet_kaz.trainers.seeding as seeding
    from nnunet_kaz.inference.sliding_window import dropout_modules

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    nnunet_trainer.DDP = _cpu_ddp
    seeded = []
    own = seeding.seed_everything

    def recording(seed):
        own(seed)
        seeded.append({"torch": torch.initial_seed(), "numpy": _digest(np.random.get_state()[1]),
                       "random": _digest(np.array(random.getstate()[1]))})

    seeding.seed_everything = recording
    plans = load_json(f"{nnUNet_preprocessed}/{KAZ}/nnUNetTinyPlans.json")
    dataset_json = load_json(f"{nnUNet_preprocessed}/{KAZ}/dataset.json")
    report = {}
    for name in DDP_TRAINERS:
        for seed in (0, 1):
            cls = type(f"{name}_ddpseed{seed}", (getattr(trainers, name),), {"seed": seed})
            # as run_training.get_trainer_from_args hands the plans over (it pops continue_training)
            trainer = cls({**plans, "continue_training": False}, "2d", 0, dataset_json, torch.device("cpu"))
            trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net's DDP assumes CUDA
            trainer.initialize()
            stream = seeded[-1]
            train, _ = trainer.get_dataloaders()
            masks = []
            hooks = [m.register_forward_hook(lambda m, i, o: masks.append(((o == 0) & (i[0] != 0)).detach().numpy()))
                     for m in dropout_modules(trainer.network.module)]
            batches = []
            trainer.network.train()
            for _ in range(2):
                batch = next(train)
                batches.append(batch["data"].numpy())
                trainer.train_step(batch)
            for h in hooks:
                h.remove()
            assert masks, f"{name} has no dropout"
            report[f"{name}/{seed}"] = {**stream, "batches": _digest(*batches), "dropout": _digest(*masks)}
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(report, f)


@pytest.mark.integration
def test_two_gloo_ranks_draw_their_own_streams_and_seeds_never_share_one(tiny_kaz, tmp_path):
    """Two processes (gloo, CPU) train an MHEX+ and an XBoundNet++ trainer two steps under nnU-Net's DDP
    initialisation, with seeds 0 and 1: the ranks of one seed start from different torch / numpy / random
    streams and draw different augmented batches and dropout masks; the four (seed, rank) streams of a trainer
    are all different, in particular rank 1 of seed 0 and rank 0 of seed 1 (the same stream under seed + rank)."""
    import json
    import subprocess
    import sys

    code = ("import sys; from tests.test_ddp import ddp_worker; "
            "ddp_worker(int(sys.argv[1]), 2, sys.argv[2], sys.argv[3])")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(store), str(tmp_path / f"rank{r}.json")],
                              env=tiny_kaz.env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in DDP_TRAINERS:
        for seed in (0, 1):
            a, b = ranks[0][f"{name}/{seed}"], ranks[1][f"{name}/{seed}"]
            for key in ("torch", "numpy", "random", "batches", "dropout"):
                assert a[key] != b[key], (name, seed, key)
        streams = [(ranks[r][f"{name}/{s}"]["torch"], ranks[r][f"{name}/{s}"]["numpy"]) for r in range(2)
                   for s in (0, 1)]
        assert len(set(streams)) == 4, name
        assert ranks[1][f"{name}/0"]["dropout"] != ranks[0][f"{name}/1"]["dropout"], name
