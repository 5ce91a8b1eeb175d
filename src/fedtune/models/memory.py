"""Peak training memory of a client, measured on CUDA by the allocator and on CPU by a tensor breakdown."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _nbytes(tensors, seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages counted once)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


class MemoryMeter:
    """Peak memory of training steps on ``device``.

    Use ``with meter.step(): loss = ...; loss.backward()`` around each step and ``meter.observe(model, optimizer)``
    after it. On CUDA the peak is the allocator's ``max_memory_allocated`` during the steps (peak stats reset on
    entry to each step). On CPU there are no allocator statistics, so the peak is a measured breakdown, summed as if
    all parts were alive together:

    - ``parameters``: bytes of the module's parameters and buffers (distinct storages);
    - ``gradients``: bytes of the ``.grad`` tensors present after the step;
    - ``optimizer_state``: bytes of the real tensors in ``optimizer.state`` (e.g. AdamW moments);
    - ``activations``: bytes of tensors saved for backward during one step, recorded by
      ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage, parameters skipped) — all of them are
      alive when the forward pass ends, which is the activation peak of a forward+backward step.
    """

    def __init__(self, device: torch.device | str, by_tensors: bool = False) -> None:
        """``by_tensors``: use the tensor breakdown even on CUDA (e.g. to charge one side of a split on a
        device shared by both sides, where the allocator peak cannot tell them apart)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and not by_tensors
        self._param_ptrs: set[int] = set()
        self._parts = dict.fromkeys(("parameters", "gradients", "optimizer_state", "activations"), 0)
        self._cuda_peak = 0  # allocator peak over the steps

    @contextmanager
    def step(self, module: nn.Module | None = None) -> Iterator[None]:
        """Measure one training step (forward and backward); ``module`` helps skip its params on the first step."""
        if module is not None:
            self._param_ptrs |= {p.untyped_storage().data_ptr() for p in module.parameters()}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        seen: set[int] = set()
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            base = t if t._base is None else t._base  # weights are often saved as views (e.g. transposed)
            if not isinstance(base, nn.Parameter) and t.untyped_storage().data_ptr() not in self._param_ptrs:
                saved += _nbytes([t], seen)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self._parts["activations"] = max(self._parts["activations"], saved)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))

    def observe(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Record resident parameters, gradients and optimizer state after a step."""
        params = list(model.parameters())
        self._param_ptrs |= {p.untyped_storage().data_ptr() for p in params}
        b = self._parts
        b["parameters"] = max(b["parameters"], _nbytes([*params, *model.buffers()], set()))
        b["gradients"] = max(b["gradients"], _nbytes([p.grad for p in params if p.grad is not None], set()))
        if optimizer is not None:
            state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            b["optimizer_state"] = max(b["optimizer_state"], _nbytes(state, set()))

    @property
    def peak_bytes(self) -> int:
        """Peak bytes seen so far (CUDA: allocator peak; CPU: sum of the breakdown parts)."""
        return self._cuda_peak if self.cuda else sum(self._parts.values())

    @property
    def breakdown(self) -> dict[str, int]:
        """Bytes per part (each the maximum seen), plus ``cuda_max_allocated`` on CUDA and the ``peak``."""
        out = dict(self._parts)
        if self.cuda:
            out["cuda_max_allocated"] = self._cuda_peak
        out["peak"] = self.peak_bytes
        return out
