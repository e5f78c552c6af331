"""A KV cache that appends a decoding step in place instead of copying the whole cache.

transformers' ``DynamicLayer`` appends each step's key and value with ``torch.cat``, which
copies every cached position of every layer on every decoding step: for SmolLM2-135M at
batch 16 and 1,000 cached positions that is 0.7 GB copied per step, 23% of a CPU decoding
step in a profile of the labeller (docs/worker.md). ``GrowingLayer`` keeps its keys and
values as views of the first ``length`` positions of buffers with spare room, so a step
writes one position; the buffers grow by a quarter (amortized O(1) copying per step) when
they fill.

The engine still replaces ``keys``/``values`` wholesale when rows leave or batches merge
(``batch_select_indices``, slicing, ``GrowingCache.from_tensors``); ``update`` notices that
the tensors are no longer views of its buffer and starts a new one, so those paths stay
exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

# Spare room added when a buffer is (re)allocated: a quarter of the needed length, at least
# this many positions, so short caches do not reallocate every few steps.
MIN_SPARE_POSITIONS = 64
GROWTH = 0.25


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose appends write into preallocated room."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _has_room(self, new: int) -> bool:
        """True when ``keys``/``values`` are still the leading views of this layer's buffers
        and the buffers have ``new`` more positions."""
        buffers = self._key_buffer, self._value_buffer
        if buffers[0] is None or buffers[1] is None:
            return False
        for view, buffer in zip((self.keys, self.values), buffers, strict=True):
            if (
                view.data_ptr() != buffer.data_ptr()
                or view.shape[:2] != buffer.shape[:2]
                or view.shape[3] != buffer.shape[3]
                or view.stride() != buffer.stride()
                or view.shape[2] + new > buffer.shape[2]
            ):
                return False
        return True

    def _reallocate(self, needed: int) -> None:
        capacity = needed + max(MIN_SPARE_POSITIONS, int(needed * GROWTH))

        def with_room(current: torch.Tensor) -> torch.Tensor:
            batch, heads, length, dim = current.shape
            buffer = current.new_empty((batch, heads, capacity, dim))
            buffer[:, :, :length] = current
            return buffer

        self._key_buffer = with_room(self.keys)
        self._value_buffer = with_room(self.values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.numel() == 0:
            self.keys, self.values = key_states, value_states
            self._key_buffer = self._value_buffer = None
            return self.keys, self.values
        new = key_states.shape[-2]
        if not self._has_room(new):
            self._reallocate(self.keys.shape[-2] + new)
        assert self._key_buffer is not None and self._value_buffer is not None
        start = self.keys.shape[-2]
        end = start + new
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` made of ``GrowingLayer``s (no config: every layer full attention,
    which is what the engine's left-padded batches assume)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    @classmethod
    def from_tensors(cls, layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> GrowingCache:
        """A cache holding these (keys, values) per layer, as they are (no copy)."""
        cache = cls()
        for keys, values in layers:
            layer = GrowingLayer()
            layer.update(keys, values)
            cache.layers.append(layer)
        return cache
