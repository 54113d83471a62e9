"""Activation memory accounting with saved-tensor hooks (works on CPU; spec section 6).

Counts the bytes of tensors autograd saved for backward that are still alive (a region saved
twice counts once) and excluding parameters, which are not activations. The count drops
when autograd frees a graph, so ``peak_bytes`` is the most activation memory held at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch


class _Saved:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], meter: ActivationMemory) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class ActivationMemory:
    def __init__(
        self, parameters: Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor] = ()
    ) -> None:
        """``parameters`` (or a function giving them, re-read on every ``hooks()``: sharded
        parameters are gathered into new tensors for each forward) are not activations."""
        self._parameters = parameters if callable(parameters) else list(parameters).copy
        self._excluded: set[int] = set()
        self._live: dict[tuple[int, int], list[int]] = {}  # (address, bytes) -> [references, bytes]
        self.current_bytes = 0
        self.peak_bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Context manager: tensors saved for backward inside it are counted."""
        self._excluded = set()
        for p in self._parameters():
            with contextlib.suppress(RuntimeError):  # a sharded parameter has no local storage
                self._excluded.add(p.untyped_storage().data_ptr())
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def hold(self, tensor: torch.Tensor) -> _Saved:
        """Count ``tensor`` as held until the returned handle (``.tensor``) is dropped: for
        activations a rule keeps itself, outside autograd's graphs."""
        packed = self._pack(tensor)
        return packed if isinstance(packed, _Saved) else _Saved(tensor, (0, 0), self)

    def _pack(self, tensor: torch.Tensor):
        if tensor.layout != torch.strided or tensor.is_meta:
            return tensor
        if tensor.untyped_storage().data_ptr() in self._excluded or tensor.data_ptr() == 0:
            return tensor
        # Views of one region (x, x.t()) count once; chunks of one buffer count separately.
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes)
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1
        return _Saved(tensor, key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: tuple[int, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current_bytes -= entry[1]
