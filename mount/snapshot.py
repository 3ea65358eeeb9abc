"""The host snapshot: the only part of a save the training loop waits for.

`Snapshotter.snapshot(state)` returns a copy of `state` that the loop may no
longer touch: tensors are copied into host buffers that are reused from one save
to the next (pinned on CUDA, so the device-to-host copies run at full speed and
are waited for once at the end), containers are rebuilt and other leaves are
deep-copied. The caller must not take a new snapshot while the previous one is
still being written: the buffers are the same (the checkpointer guarantees it).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch

log = logging.getLogger(__name__)

try:  # DTensor exists in every torch with DCP, but keep the snapshot importable without it.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[misc,assignment]  # the class or None: callers test `DTensor is not None`


class Snapshotter:
    """Copies state trees to host memory into buffers reused across saves."""

    def __init__(self, *, pin_memory: bool | None = None):
        # None: pin when the source is on CUDA (pinning CPU copies buys nothing).
        self._pin = pin_memory
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.last_bytes = 0

    def snapshot(self, state: Any) -> Any:
        """Return a host copy of `state`, complete when this returns."""
        self._used: set[tuple] = set()
        self._memo: dict[int, Any] = {}
        self._devices: set[torch.device] = set()
        self.last_bytes = 0
        with torch.no_grad():
            out = self._copy(state, ())
        for dev in self._devices:
            torch.cuda.current_stream(dev).synchronize()
        for stale in self._buffers.keys() - self._used:
            del self._buffers[stale]  # the state's shape changed: free what no longer fits
        del self._memo
        return out

    def _copy(self, obj: Any, path: tuple) -> Any:
        if id(obj) in self._memo:  # tied weights stay tied; containers are not cyclic here
            return self._memo[id(obj)]
        if isinstance(obj, torch.Tensor):
            out: Any = self._copy_tensor(obj, path)
        elif type(obj) in (dict, OrderedDict):
            out = type(obj)((k, self._copy(v, (*path, k))) for k, v in obj.items())
        elif type(obj) is list:
            out = [self._copy(v, (*path, i)) for i, v in enumerate(obj)]
        elif type(obj) is tuple:
            out = tuple(self._copy(v, (*path, i)) for i, v in enumerate(obj))
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            out = type(obj)(*(self._copy(v, (*path, i)) for i, v in enumerate(obj)))
        else:
            out = copy.deepcopy(obj)
        if isinstance(obj, (torch.Tensor, dict, list, tuple)):
            self._memo[id(obj)] = out
        return out

    def _copy_tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        if DTensor is not None and isinstance(t, DTensor):
            local = self._copy_tensor(t.to_local(), (*path, "<local>"))
            return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                      shape=t.shape, stride=t.stride())
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided \
                or t.is_meta:
            return t.detach().to("cpu", copy=True)  # rare kinds: no buffer reuse
        buf = self._buffer(t, path)
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        if t.is_cuda:
            self._devices.add(t.device)
        self.last_bytes += buf.numel() * buf.element_size()
        return buf

    def _buffer(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        """The reused host buffer for the tensor at `path` (new when shape or dtype changed)."""
        self._used.add(path)
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = self._pin if self._pin is not None else t.is_cuda
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buf
        return buf
