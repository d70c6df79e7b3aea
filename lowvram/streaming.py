"""Streamed blocks: weights kept in (pinned) CPU memory and copied to the GPU just before the block runs.

For prompt-heavy work on a GPU too small for the model. A block that does not fit still computes on the
GPU, its weights crossing PCIe once per forward: a GLM-4-9B INT4 block is ~120 MB, ~5 ms at 25 GB/s,
far less than a 512-token prompt takes through that block on a CPU. The next streamed block's copy runs
on a side stream while this one computes. Decode gains nothing over a CPU-resident block (the copy
is per token, at about the CPU's own memory bandwidth), so blocks are streamed only when asked:
placement targets `stream:cuda:0=30-39`, or `plan(..., stream=True)`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .kernels import PackedWeight

# Backends whose weights cannot be swapped: native code holds raw pointers to them (native, ort), or the
# tensors carry state a plain copy drops (bitsandbytes' Params4bit/Int8Params and their quant_state).
_UNSWAPPABLE_BACKENDS = ("kernels.native", "kernels.ort", "kernels.bnb")


def tensor_slots(module: nn.Module) -> list[tuple[object, str]]:
    """Every tensor a block holds, as (owner, key): parameters and buffers (owner = the module's dict),
    tensor attributes of quantized modules and the fields of their PackedWeights."""
    slots: list[tuple[object, str]] = []
    for m in module.modules():
        if type(m).__module__.endswith(_UNSWAPPABLE_BACKENDS):
            raise ValueError(f"cannot stream a block computed by {type(m).__module__} (its weights cannot be "
                             "copied in and out); streamed blocks run on the cuda backend")
        for d in (m._parameters, m._buffers):
            slots += [(d, k) for k, v in d.items() if v is not None]
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                slots.append((m, k))
            elif isinstance(v, PackedWeight):
                slots += [(v, f.name) for f in dataclasses.fields(v) if isinstance(getattr(v, f.name), torch.Tensor)]
    return slots


def _get(owner, key):
    return owner[key] if isinstance(owner, dict) else getattr(owner, key)


def _set(owner, key, value):
    if isinstance(owner, dict):
        owner[key] = value
    else:
        object.__setattr__(owner, key, value)


def offload(module: nn.Module, pin: bool) -> list[tuple[object, str]]:
    """Move every tensor of `module` to CPU memory (page-locked when `pin`, so copies to a GPU can overlap);
    returns its tensor slots."""
    slots = tensor_slots(module)
    for owner, key in slots:
        t = _get(owner, key).detach().cpu()
        _set(owner, key, t.pin_memory() if pin else t)
    return slots


_side_streams: dict[torch.device, object] = {}


class StreamedBlock(nn.Module):
    """A block whose weights live on the CPU and are copied to `device` for each forward."""

    def __init__(self, block: nn.Module, device: torch.device):
        super().__init__()
        self.block = block
        self.device = torch.device(device)
        self.slots = offload(block, pin=self.device.type == "cuda")
        self.host = [_get(o, k) for o, k in self.slots]
        # the next streamed block, prefetched while this one runs (a plain attribute, not a submodule)
        object.__setattr__(self, "next", None)
        self._staged = None
        self._event = None

    def prefetch(self) -> None:
        """Start copying the weights to the device (on a side stream on CUDA); no-op if already staged."""
        if self._staged is not None:
            return
        if self.device.type == "cuda":
            if self.device not in _side_streams:  # one copy stream per GPU, made once
                _side_streams[self.device] = torch.cuda.Stream(self.device)
            side = _side_streams[self.device]
            with torch.cuda.stream(side):
                self._staged = [t.to(self.device, non_blocking=True) for t in self.host]
                self._event = torch.cuda.Event()
                self._event.record(side)
        else:
            self._staged = [t.to(self.device, copy=True) for t in self.host]

    def forward(self, *args, **kw):
        self.prefetch()
        staged, event = self._staged, self._event
        self._staged = self._event = None
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for t in staged:  # allocated on the side stream, used on this one: keep them until it is done
                t.record_stream(main)
        if self.next is not None:
            self.next.prefetch()
        for (o, k), t in zip(self.slots, staged):
            _set(o, k, t)
        try:
            return self.block(*args, **kw)
        finally:
            for (o, k), t in zip(self.slots, self.host):
                _set(o, k, t)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attn_norm, mlp, ...: the wrapped block's
            if "block" not in self._modules:
                raise
            return getattr(self._modules["block"], name)


def stream_blocks(net, streamed: dict[int, torch.device]) -> None:
    """Wrap the blocks `streamed` maps to their compute device, each linked to the next for prefetching; the
    last to the first, whose copy then overlaps the resident blocks and sampling before the next token (still
    at most two blocks staged: the plan's room)."""
    wrapped = []
    for i in sorted(streamed):
        net.layers[i] = StreamedBlock(net.layers[i], streamed[i])
        wrapped.append(net.layers[i])
    for a, b in zip(wrapped, wrapped[1:] + wrapped[:1]):
        object.__setattr__(a, "next", b)
