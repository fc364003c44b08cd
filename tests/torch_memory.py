"""Counting what torch really allocates, for the memory tests (issue 23): every tensor an operator returns is
recorded by the storage it lives in, until the last tensor of that storage is gone."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that torch operators allocated inside the block and that are still referenced by a
    tensor (`now`), and their maximum (`peak`). Views share their base's storage and count once; tensors made
    before the block (e.g. the input image), their views and aliases, and tensors made outside torch's operators
    (torch.from_numpy) are not counted.
    `pinned`: the operators that asked for page-locked memory."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]
        self.now = self.peak = 0
        self.pinned: list[str] = []

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("pin_memory") or "pin_memory" in str(func):
            self.pinned.append(str(func))
        out = func(*args, **kwargs)
        # an output that aliases an input (a view, or `.to` that had nothing to do) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in inputs and key not in self.storages):
                continue
            if key not in self.storages:
                self.storages[key] = [storage.nbytes(), 0]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self.storages[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out
