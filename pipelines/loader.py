"""The loader that training iterates: DALI pipelines over this rank's part of the shards.

    loader = create_loader(data=OUT, split="train", spec=spec, batch_size=64, train=True,
                           rank=rank, world_size=world, device="cuda")
    for batch in loader:  # one epoch of {"pixel_values": (N,3,H,W), "labels": (N,), "mask": (N,), "keys": [N]}
        ...

The order is ours, not a reader's: `EpochSource` feeds DALI (an external source) the JPEG bytes
of this rank's batches, read with one `pread` per sample at the offsets of the DALI index.

- train: every epoch is a fresh permutation of the whole split, seeded by (seed, epoch) and the
  same on every rank; rank r takes positions [floor(r*N/W), floor((r+1)*N/W)) of it, so the ranks'
  parts are disjoint, and yields `(N // W) // batch_size` full batches of its part. The at most
  `batch_size + 1` samples per rank left over are dropped for that epoch (other ones each epoch);
  none is ever repeated within an epoch, and padding is never trained on.
- eval: rank r reads samples [floor(r*N/W), floor((r+1)*N/W)) in shard order; every rank yields
  `ceil(ceil(N / W) / batch_size)` batches of `batch_size`; `mask` marks the real samples (padding
  repeats one of them), so summing over masked samples on all ranks counts each sample exactly
  once at every eval, while every rank runs the same number of forward passes (ZeRO-3).

Batches are numbered across epochs and the source maps batch number -> samples, so nothing a
previous epoch left unread can leak into the next, and DALI's checkpoint (its batch number and
the augmentation RNG) resumes exactly mid-epoch. A run resumed with other ranks or another batch
size (`resplit`) goes on with the samples of the epoch that no rank has read yet, split afresh
among its ranks; its later epochs are whole again.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipelines.dali import Decoding, device_id_of, shard_pipeline
from pipelines.resize import eval_batch, to_device
from pipelines.shards import (SampleTable, ShardFormatError, file_sha256, jpeg_problem, load_manifest,
                              read_index)
from pipelines.spec import PreprocessSpec


RESIZES = ("dali", "torch", "pillow")
PREFETCH = 2  # batches DALI prepares ahead


def default_resize(*, gpu: bool, train: bool) -> str:
    """DALI's resize on GPU (batched, in the graph) and for training (random crops); on CPU eval,
    torch's uint8 kernels, several times faster than DALI's CPU resize and closer to Pillow."""
    return "dali" if gpu or train else "torch"


class DataError(RuntimeError):
    """A sample that fails at run time; the message names the shard and the key."""


class PipelineError(RuntimeError):
    """DALI failed, and no sample in flight is to blame (e.g. the GPU ran out of memory)."""


def preflight(*, data: Path, split: str, world_size: int, batch_size: int, train: bool,
              hash_share: tuple[int, int] | None = None) -> SampleTable:
    """The split's samples (each index file read once), after checking that its shards can serve
    this run.

    Checks, before any batch: the manifest (and that its run did not fail), that every shard and
    index file exists with the manifest's size and sample count, and that a training rank gets at
    least one full batch (eval needs one sample: ranks without any run fully masked batches).
    With `hash_share=(rank, world)` it also compares the sha256 of every world-th shard (this
    rank's share, so the ranks hash all shards between them, once) with the manifest: a shard
    modified after sharding.
    """
    data = Path(data)
    manifest = load_manifest(data)
    info = manifest["splits"].get(split)
    if not info or not info["samples"]:
        raise ShardFormatError(f"{data}: split {split!r} is empty (make_shards --val-fraction 0 writes no val)")
    problems, indexes = [], []
    for n, record in enumerate(info["shards"]):
        tar, idx = data / split / record["name"], data / split / record["index"]
        if not tar.is_file() or not idx.is_file():
            problems.append(f"{tar if not tar.is_file() else idx}: missing")
        elif tar.stat().st_size != record["bytes"]:
            problems.append(f"{tar}: {tar.stat().st_size} bytes, manifest says {record['bytes']} (truncated or modified)")
        elif len(index := read_index(idx)) != record["samples"]:
            problems.append(f"{idx}: sample count differs from the manifest")
        elif hash_share and n % hash_share[1] == hash_share[0] and file_sha256(tar) != record["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest (modified after sharding)")
        else:
            indexes.append(index)
    if problems:
        raise ShardFormatError("; ".join(problems) + f" (tools/verify_shards.py {data} checks everything)")
    if train and info["samples"] // world_size < batch_size:
        raise ShardFormatError(
            f"{data}/{split}: {info['samples']} samples over {world_size} ranks is less than one batch of "
            f"{batch_size} per rank; lower the micro batch size"
        )
    return SampleTable([data / split / record["name"] for record in info["shards"]], indexes)


def create_loader(
    *,
    data: str | Path,
    split: str,
    spec: PreprocessSpec,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    augment: dict | None = None,
    state: dict | None = None,
    verify_hashes: bool = False,
    resize: str | None = None,
    decoding: Decoding = Decoding(),
) -> "DaliLoader":
    """A DaliLoader over `data/split` for this rank; `device` defaults to the local GPU if any.

    `state` is a `DaliLoader.state_dict()` to resume from (with `"dali": None`, from its epoch and
    step, the augmentation's random state seeded afresh: for a changed augmentation graph; see
    `resplit` for a state saved by other ranks).
    `verify_hashes`: this rank checks the sha256 of its share of the shards (see `preflight`).

    `resize` (eval): "dali" resizes in the DALI graph (the default on GPU); "torch" and "pillow"
    take DALI's decoded images and resize, crop and normalize in torch on the device
    (pipelines/resize.py): "torch" with torch's antialiased kernels (the default on CPU, where its
    uint8 kernels are much faster than DALI's CPU resize and closer to Pillow), "pillow" with
    Pillow's own arithmetic, bit-identical to the processor's PIL backend and slower.
    `decoding`: how JPEGs decode on GPU (`pipelines.dali.Decoding`: the hardware decoder's share,
    chroma upsampling).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_id = device_id_of(device)
    gpu = device_id is not None
    resize = resize or default_resize(gpu=gpu, train=train)
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if resize != "dali" and train:
        raise ValueError(f"resize={resize!r} is for eval loaders: training resizes its random crops in DALI")
    table = preflight(data=Path(data), split=split, world_size=world_size, batch_size=batch_size, train=train,
                      hash_share=(rank, world_size) if verify_hashes else None)
    source = EpochSource(table, rank=rank, world_size=world_size, batch_size=batch_size, shuffle=train, seed=seed,
                         full_batches=train, state=state)
    fresh = bool(state) and state.get("dali") is None  # resumed without DALI's checkpoint: seeded afresh
    pipe = shard_pipeline(
        source=source, spec=spec, train=train, gpu=gpu, layout="HWC" if channels_last else "CHW",
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT, augment=augment or {},
        batch_size=batch_size, num_threads=num_threads or len(os.sched_getaffinity(0)),
        device_id=device_id, seed=_seed(seed, rank, source) if fresh else seed + rank,
        enable_checkpointing=True, checkpoint=(state or {}).get("dali"), prefetch_queue_depth=PREFETCH,
        # only automatic augmentation branches; AutoGraph's rewrite of the graph is otherwise wasted
        enable_conditionals=bool((augment or {}).get("auto_augment")),
        decode_only=resize != "dali", decoding=decoding,
    )
    pipe.build()
    return DaliLoader(pipe, source=source, device=device, dtype=dtype, channels_last=channels_last, state=state,
                      spec=spec, resize=resize)


def resplit(state: dict, *, world_size: int, batch_size: int) -> dict:
    """A train loader's `state`, saved by `world_size` ranks reading batches of `batch_size`, as
    the state to resume from with other ranks or another batch size: what its ranks read of the
    epoch is noted as taken (each rank a prefix of its part), and the rest of the epoch is split
    among the new ranks; DALI's per-rank checkpoint does not carry over (augmentation seeded afresh)."""
    taken = [*state.get("taken", []), [world_size, state["step"] * batch_size]]
    return {"epoch": state["epoch"], "step": 0, "taken": taken, "dali": None}


class EpochSource:
    """DALI's external source: batch number (counted over all epochs) -> this rank's samples.

    Stateless by design: DALI passes the batch number (`BatchInfo.iteration`, restored from its
    checkpoint), and the loader `state` resumed from says where DALI's numbers start (its
    "iteration" is batch "step" of "epoch"; a loader resumed without DALI's checkpoint starts DALI
    at 0) and what earlier runs with other ranks took of that epoch ("taken": [world size, samples
    each of its ranks read] in turn). Returns the JPEG bytes, the labels, and the sample ids, where
    padding (eval, past this rank's part) is `-(id + 1)` of the sample it repeats.
    """

    def __init__(self, table: SampleTable, *, rank: int, world_size: int, batch_size: int, shuffle: bool,
                 seed: int, full_batches: bool, state: dict | None = None):
        self.table, self.rank, self.world_size, self.batch_size = table, rank, world_size, batch_size
        self.shuffle, self.seed, self.full_batches = shuffle, seed, full_batches
        self.steps = self._batches(len(table))  # of a whole epoch
        state = state or {}
        self.epoch, self.step = state.get("epoch", 0), state.get("step", 0)  # where DALI's `iteration` is
        self.taken = [tuple(t) for t in state.get("taken", [])]  # of self.epoch, by earlier runs' ranks
        if state.get("dali") is None:  # a fresh pipeline (or none to resume) counts from 0
            self.iteration = 0
        else:  # checkpoints from before "iteration" was saved: DALI counted from the run's first batch
            self.iteration = state.get("iteration", self.epoch * self.steps + self.step)
        self.taken_samples = sum(world * each for world, each in self.taken)  # each rank took a prefix of its part
        self._parts: dict[int, np.ndarray] = {}

    def _batches(self, n: int) -> int:
        """Batches per rank for an epoch of `n` samples: train, full ones, equal on every rank (padding
        never needed); eval, every sample once, the last batches padded."""
        if self.full_batches:
            return (n // self.world_size) // self.batch_size
        return math.ceil(math.ceil(n / self.world_size) / self.batch_size)

    def left(self, epoch: int) -> np.ndarray:
        """The samples of `epoch` that the ranks of earlier runs did not take, in the epoch's order."""
        n = len(self.table)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for world, each in self.taken if epoch == self.epoch else ():
            starts = np.arange(world) * len(order) // world
            keep = np.ones(len(order), dtype=bool)
            for start in starts:
                keep[start : start + each] = False
            order = order[keep]
        return order

    def part(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for `epoch`, in the order they are read."""
        if epoch not in self._parts:
            order = self.left(epoch)
            n = len(order)
            self._parts = {e: p for e, p in self._parts.items() if e >= epoch - 1}  # prefetch crosses epochs
            self._parts[epoch] = order[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]
        return self._parts[epoch]

    def steps_in(self, epoch: int) -> int:
        """This rank's batches in `epoch` (fewer in the epoch a resplit run resumes)."""
        return self._batches(len(self.table) - self.taken_samples) if epoch == self.epoch else self.steps

    def locate(self, iteration: int) -> tuple[int, int]:
        """(epoch, batch of the epoch) of DALI's batch number `iteration`."""
        epoch, step = self.epoch, self.step + iteration - self.iteration
        if step >= (first := self.steps_in(epoch)):
            epoch, step = divmod(step - first, self.steps)
            epoch += self.epoch + 1
        return epoch, step

    def batch_ids(self, iteration: int) -> np.ndarray:
        epoch, step = self.locate(iteration)
        part = self.part(epoch)
        ids = part[step * self.batch_size : (step + 1) * self.batch_size]
        fill = part[0] if len(part) else 0
        return np.concatenate([ids, np.full(self.batch_size - len(ids), -(fill + 1), dtype=np.int64)])

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        ids = self.batch_ids(info.iteration)
        jpegs, labels = [], np.empty(len(ids), dtype=np.int64)
        for j, i in enumerate(ids):
            jpeg, cls = self.table.read(_real(i))
            if not cls.isdigit():
                raise DataError(f"{self.table.where(_real(i))}: label {cls[:20]!r} is not a class id")
            jpegs.append(np.frombuffer(jpeg, dtype=np.uint8))
            labels[j] = int(cls)
        return jpegs, labels, ids


def _seed(seed: int, rank: int, source: EpochSource) -> int:
    """DALI's seed for a pipeline resumed mid-run without DALI's checkpoint: not the stream that the
    run's first batch had, nor that of another resumed position."""
    entropy = [seed, rank, source.epoch, source.step, *(x for t in source.taken for x in t)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def _real(i: int) -> int:
    return int(i) if i >= 0 else -int(i) - 1


class DaliLoader:
    """Iterates one epoch per `iter()`; `len()` is the batches per epoch, equal on every rank."""

    def __init__(self, pipe, *, source: EpochSource, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 state: dict | None, spec: PreprocessSpec, resize: str):
        self.pipe, self.source, self.spec, self.resize = pipe, source, spec, resize
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.steps = source.steps
        self.epoch, self.step, self.iteration = source.epoch, source.step, source.iteration
        # self.step: batches of the current epoch already returned; self.iteration: DALI's next batch number

    def __len__(self) -> int:
        """Batches per epoch (the epoch a resplit run resumes has fewer: `steps_in`)."""
        return self.steps

    def __iter__(self):
        while self.step < self.source.steps_in(self.epoch):
            batch = self._next_batch()
            self.step, self.iteration = self.step + 1, self.iteration + 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def batches_read(self) -> float:
        """The batches per rank this epoch has read so far, counting what the ranks of earlier runs
        took of it (an epoch resumed with other ranks) at this loader's batches of every rank."""
        source = self.source
        taken = source.taken_samples / (source.batch_size * source.world_size) if self.epoch == source.epoch else 0
        return taken + self.step

    def progress(self, *, accum: int = 1) -> float:
        """Epochs done: the epoch, plus the share of a whole epoch read so far (all of it once it has
        ended: fewer than `accum` batches left, which a trainer's step of `accum` drops)."""
        if self.ended(accum=accum):
            return self.epoch + 1.0
        return self.epoch + (min(1.0, self.batches_read() / self.steps) if self.steps else 0.0)

    def ended(self, *, accum: int = 1) -> bool:
        """Whether this loader's epoch has no step of `accum` batches left."""
        return self.source.steps_in(self.epoch) - self.step < accum

    def state_dict(self, *, accum: int = 1) -> dict:
        """Where this loader stands: epoch, step, DALI's batch number and RNG state, and what earlier
        runs with other ranks took of this epoch. At the end of an epoch (fewer than `accum` batches
        left: a trainer's step of `accum` drops them), the start of the next: a run resumed with a
        smaller batch would otherwise read the epoch's rest as one more step of an epoch already
        ended and evaluated."""
        epoch, step = (self.epoch + 1, 0) if self.ended(accum=accum) else (self.epoch, self.step)
        taken = self.source.taken if epoch == self.source.epoch else []
        return {"epoch": epoch, "step": step, "iteration": self.iteration, "taken": [list(t) for t in taken],
                "dali": self.pipe.checkpoint()}

    def _run(self):
        try:
            return self.pipe.run()
        except DataError:  # from the source, naming the sample
            raise
        except Exception as e:
            raise self._diagnose(e) from e

    def _diagnose(self, error: Exception) -> Exception:
        """DALI's message names an operator, not a sample: check the samples of the batches in
        flight (this one and the prefetched ones: a bounded amount of work) with Pillow."""
        table = self.source.table
        message = _first_error_line(str(error))
        for iteration in range(self.iteration, self.iteration + PREFETCH + 1):
            for i in self.source.batch_ids(iteration):
                if i >= 0 and (problem := jpeg_problem(table.read(int(i))[0])):
                    return DataError(f"{table.where(int(i))}: {problem}; DALI: {message}")
        return PipelineError(f"DALI failed at batch {self.step} of epoch {self.epoch} ({message}); every sample of "
                             f"the batches in flight decodes with Pillow, so this is not a data error as far as can "
                             f"be told (tools/verify_shards.py {table.tars[0].parent.parent} checks every shard)")

    def _next_batch(self) -> dict:
        images, labels, ids = self._run()
        ids = np.asarray(ids.as_tensor())
        keys = [self.source.table.key(_real(i)) for i in ids]
        mask = self._to_device(ids >= 0)
        labels = self._to_device(np.asarray(labels.as_tensor()))
        if self.resize != "dali":  # decoded images of any size, resized in torch (batched on GPU)
            pixels = eval_batch([self._sample(images[i]) for i in range(len(images))], self.spec, self.resize)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return {"pixel_values": pixels.to(self.dtype), "labels": labels, "mask": mask, "keys": keys}
        images = images.as_tensor()
        pixels = torch.empty(images.shape(), dtype=torch.float16 if self.dtype == torch.float16 else torch.float32,
                             device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(images, pixels, cuda_stream=stream)
        if self.channels_last:  # DALI wrote NHWC: the same memory is NCHW in channels_last layout
            pixels = pixels.permute(0, 3, 1, 2)
        return {"pixel_values": pixels.to(self.dtype), "labels": labels, "mask": mask, "keys": keys}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A small host array on this loader's device, without a host sync (resize.to_device)."""
        return to_device(torch.from_numpy(np.ascontiguousarray(array)), self.device)

    def _sample(self, image) -> torch.Tensor:
        """One DALI sample (CPU or GPU) as a torch tensor on this loader's device."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.asarray(image))
        out = torch.empty(image.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(image, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out


def _first_error_line(message: str) -> str:
    lines = [l.strip() for l in message.splitlines() if l.strip() and "pipeline" not in l.lower() and not l.startswith(" ")]
    return lines[-1] if lines else "error"
