"""An exponential moving average of the weights (--ema_decay), as timm's ModelEma and DeiT's,
ConvNeXt's and Swin's recipes keep one: after every optimizer step, average = decay x average +
(1 - decay) x weights, in fp32, of each parameter that trains.

Each rank holds the average of its 1/world share of every parameter (elements [r x c, (r + 1) x c)
of the flattened parameter, c = ceil(numel / world)): under ZeRO-3 that is the rank's partition
of the parameter, and under ZeRO-1/2 the same slice of its full copy. So the average costs
4 bytes per parameter over the ranks, the update is elementwise (the same numbers on any number
of ranks), and a checkpoint holds it whole (`state_dict`, gathered), which any number of ranks
splits afresh (`load_state_dict`; train/checkpoint.py: EMA_FILE).

Under bf16/fp16 the weights averaged are the ones the model runs with (DeepSpeed's copies in that
precision of its fp32 master weights), accumulated in fp32.

The floating-point buffers the model saves (BatchNorm's running statistics) are averaged too, as
timm's ModelEmaV2/V3 do, so that the averaged weights run with statistics of the same average:
buffers are whole on every rank, each rank averages its own (DeepSpeed leaves each rank's
statistics apart during training), and the ranks' averages are replaced by their mean before
each use (eval, checkpoint): the average of that mean, the update being linear.
"""

from __future__ import annotations

import contextlib
import math

import deepspeed
import torch
import torch.distributed as dist

from train.checkpoint import own_elements


class WeightAverage:
    """The average of `module`'s trainable parameters; `device`: where collectives run (the rank's
    accelerator; a ZeRO-3 partition offloaded to the CPU keeps its average there)."""

    def __init__(self, module: torch.nn.Module, *, decay: float, device: torch.device):
        self.decay, self.device = decay, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        for name, p in self.params:
            group = getattr(p, "ds_process_group", None)
            if group is not None and dist.get_world_size(group=group) != self.world:
                raise ValueError(f"--ema_decay: {name} is partitioned over {dist.get_world_size(group=group)} of the "
                                 f"{self.world} ranks (a ZeRO++ or MiCS partition), which the average does not follow")
            if group is not None and p.ds_tensor.numel() != self._count(p):
                raise ValueError(f"--ema_decay: ZeRO-3 partitions {name} ({_numel(p)} values) in parts of "
                                 f"{p.ds_tensor.numel()}, not {self._count(p)}, which the average does not follow")
        self.shares = [self._slot(p).detach().to(torch.float32, copy=True) for _, p in self.params]
        self.buffers = [(f"{owner}.{name}".lstrip("."), b) for owner, module_ in module.named_modules()
                        for name, b in module_._buffers.items()
                        if b is not None and b.is_floating_point() and name not in module_._non_persistent_buffers_set]
        self.buffer_averages = [b.detach().to(torch.float32, copy=True) for _, b in self.buffers]

    def reset(self) -> None:
        """The average from the weights as they are now (a run resumed from a checkpoint without one)."""
        for share, (_, p) in zip(self.shares, self.params):
            share.copy_(self._slot(p))
        for average, (_, b) in zip(self.buffer_averages, self.buffers):
            average.copy_(b)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        torch._foreach_lerp_(self.shares, [self._slot(p).float() for _, p in self.params], 1.0 - self.decay)
        if self.buffers:
            torch._foreach_lerp_(self.buffer_averages, [b.float() for _, b in self.buffers], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The average whole, by parameter and buffer name, on the CPU: on rank 0 (None on the
        others, which take part in gathering it)."""
        state = {}
        for share, (name, p) in zip(self.shares, self.params):
            whole = self._gathered(share, p)
            if self.rank == 0:
                state[name] = whole.cpu()
        self._agree_buffers()
        if self.rank != 0:
            return None
        return {**state, **{name: average.cpu() for average, (name, _) in zip(self.buffer_averages, self.buffers)}}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """This rank's share of the average `state` (saved by any number of ranks); ValueError
        naming `source` when it lacks a parameter or holds another shape."""
        for share, (name, p) in zip(self.shares, self.params):
            saved, shape = state.get(name), tuple(_shape(p))
            if saved is None or tuple(saved.shape) != shape:
                raise ValueError(f"{source}: " + (f"no average of {name}" if saved is None else
                                                  f"the average of {name} is {tuple(saved.shape)}, the model's {shape}"))
            start = min(self._start(p), _numel(p))
            share.copy_(saved.reshape(-1)[start:start + share.numel()])
        for average, (name, b) in zip(self.buffer_averages, self.buffers):
            saved = state.get(name)  # none in a checkpoint of an older version: from its statistics
            if saved is not None and saved.shape != b.shape:
                raise ValueError(f"{source}: the average of {name} is {tuple(saved.shape)}, the model's "
                                 f"{tuple(b.shape)}")
            average.copy_(b if saved is None else saved)

    @contextlib.contextmanager
    def applied(self):
        """The model runs with the averaged weights inside; its own come back bit for bit after.
        Not after an error inside: the run stops without saving, and the collectives that write
        them back would wait for ranks that are not there."""
        own = [self._slot(p).detach().to(torch.float32, copy=True) for _, p in self.params]  # fp32: exact
        own_buffers = [b.detach().clone() for _, b in self.buffers]
        self._write(self.shares)
        self._agree_buffers()
        for average, (_, b) in zip(self.buffer_averages, self.buffers):
            b.copy_(average)
        yield
        self._write(own)
        for mine, (_, b) in zip(own_buffers, self.buffers):
            b.copy_(mine)

    @torch.no_grad()
    def _agree_buffers(self) -> None:
        """Every rank's buffer averages replaced by their mean over the ranks (one broadcast and one
        all-reduce, flattened), computed as rank 0's + the mean difference from it: exact where
        the ranks agree already (a frozen module's statistics, a second call)."""
        if not self.buffers or self.world == 1:
            return
        flat = torch.cat([average.reshape(-1) for average in self.buffer_averages]).to(self.device)
        first = flat.clone()
        dist.broadcast(first, src=0)
        flat -= first
        dist.all_reduce(flat)
        flat = flat.div_(self.world).add_(first).to(self.buffer_averages[0].device)
        parts = flat.split([a.numel() for a in self.buffer_averages])
        torch._foreach_copy_(self.buffer_averages, [part.view_as(a) for part, a in zip(parts, self.buffer_averages)])

    @torch.no_grad()
    def _write(self, shares: list[torch.Tensor]) -> None:
        """Every parameter set whole from the ranks' `shares` (ZeRO-3: through deepspeed's
        GatheredParameters, which partitions rank 0's values again; elsewhere it does nothing).
        One parameter at a time: a ZeRO-3 model is never whole on a rank."""
        for share, (_, p) in zip(shares, self.params):
            whole = self._gathered(share, p)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(whole.to(p.device, p.dtype))

    def _gathered(self, share: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Parameter `p`'s values whole, in fp32, from every rank's `share`."""
        padded = torch.zeros(self._count(p), dtype=torch.float32, device=self.device)
        padded[:share.numel()] = share
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:_numel(p)].view(_shape(p))

    def _count(self, p: torch.Tensor) -> int:
        return math.ceil(_numel(p) / self.world)

    def _start(self, p: torch.Tensor) -> int:
        return self.rank * self._count(p)

    def _slot(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's elements of `p`, a view: its ZeRO-3 partition less the padding, or the same
        slice of the full parameter."""
        if getattr(p, "ds_tensor", None) is not None:
            return own_elements(p)
        start = min(self._start(p), _numel(p))
        return p.data.view(-1).narrow(0, start, min(self._count(p), _numel(p) - start))


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def _shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", None) or p.shape
