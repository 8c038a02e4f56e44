"""The loader that training iterates: DALI pipelines over this rank's part of the shards.

    loader = create_loader(data=OUT, split="train", spec=spec, batch_size=64, train=True,
                           rank=rank, world_size=world, device="cuda")
    for batch in loader:  # one epoch of {"pixel_values": (N,3,H,W), "labels": (N,), "mask": (N,), "keys": [N]}
        ...

Sharding (DALI's reader, `shard_id` = rank, `num_shards` = world size): rank r reads samples
[floor(r*N/W), floor((r+1)*N/W)) of the split, shuffled for training, and moves to the next
part each epoch. The rules that keep ranks in lockstep and counts exact:

- train: every rank yields `(N // W) // batch_size` full batches per epoch; the at most
  `batch_size + 1` samples per rank left over are dropped for that epoch (other ones each epoch,
  since the order is reshuffled). No sample is repeated within an epoch; when N is a multiple
  of W * batch_size every sample is seen exactly once.
- eval: every rank yields `ceil(ceil(N / W) / batch_size)` batches of `batch_size`; `mask` marks
  the real samples, so summing over masked samples on all ranks counts each sample exactly once
  (padding is never counted), while every rank runs the same number of forward passes (ZeRO-3).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipelines.dali import device_id_of, shard_pipeline
from pipelines.resize import eval_image
from pipelines.shards import ShardFormatError, file_sha256, find_undecodable, load_manifest, read_index
from pipelines.spec import PreprocessSpec


RESIZES = ("dali", "torch", "pillow")


def default_resize(*, gpu: bool, train: bool) -> str:
    """DALI's resize on GPU (batched, in the graph) and for training (random crops); on CPU eval,
    torch's uint8 kernels, several times faster than DALI's CPU resize and closer to Pillow."""
    return "dali" if gpu or train else "torch"


class DataError(RuntimeError):
    """A sample that fails at run time; the message names the shard and the key."""


def preflight(*, data: Path, split: str, world_size: int, batch_size: int, train: bool,
              hash_share: tuple[int, int] | None = None) -> dict:
    """The split's manifest entry, after checking that its shards can serve this run.

    Checks, before any batch: the manifest (and that its run did not fail), that every shard and
    index file exists with the manifest's size and sample count, that there are at least as many
    shards as ranks, and that a training rank gets at least one full batch. With
    `hash_share=(rank, world)` it also compares the sha256 of every world-th shard (this rank's
    share, so the ranks hash all shards between them, once) with the manifest: a shard modified
    after sharding.
    """
    data = Path(data)
    manifest = load_manifest(data)
    info = manifest["splits"].get(split)
    if not info or not info["samples"]:
        raise ShardFormatError(f"{data}: split {split!r} is empty (make_shards --val-fraction 0 writes no val)")
    problems = []
    for n, record in enumerate(info["shards"]):
        tar, idx = data / split / record["name"], data / split / record["index"]
        if not tar.is_file() or not idx.is_file():
            problems.append(f"{tar if not tar.is_file() else idx}: missing")
        elif tar.stat().st_size != record["bytes"]:
            problems.append(f"{tar}: {tar.stat().st_size} bytes, manifest says {record['bytes']} (truncated or modified)")
        elif len(read_index(idx)) != record["samples"]:
            problems.append(f"{idx}: sample count differs from the manifest")
        elif hash_share and n % hash_share[1] == hash_share[0] and file_sha256(tar) != record["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest (modified after sharding)")
    if problems:
        raise ShardFormatError("; ".join(problems) + f" (tools/verify_shards.py {data} checks everything)")
    if len(info["shards"]) < world_size:
        raise ShardFormatError(
            f"{data}/{split} has {len(info['shards'])} shards for {world_size} ranks; rerun tools/make_shards.py "
            f"with --max-count {max(1, info['samples'] // world_size)} or less"
        )
    if train and info["samples"] // world_size < batch_size:
        raise ShardFormatError(
            f"{data}/{split}: {info['samples']} samples over {world_size} ranks is less than one batch of "
            f"{batch_size} per rank; lower the micro batch size"
        )
    return info


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
    expected_size: tuple[int, int] | None = None,
    state: dict | None = None,
    verify_hashes: bool = False,
    resize: str | None = None,
) -> "DaliLoader":
    """A DaliLoader over `data/split` for this rank; `device` defaults to the local GPU if any.

    `expected_size` is the model's input size, checked against the processor's output size.
    `state` is a `DaliLoader.state_dict()` to resume from. `verify_hashes`: this rank checks the
    sha256 of its share of the shards (see `preflight`).

    `resize` (eval): "dali" resizes in the DALI graph (the default on GPU); "torch" and "pillow"
    take DALI's decoded images and resize, crop and normalize in torch on the device
    (pipelines/resize.py): "torch" with torch's antialiased kernels (the default on CPU, where its
    uint8 kernels are much faster than DALI's CPU resize and closer to Pillow), "pillow" with
    Pillow's own arithmetic, bit-identical to the processor's PIL backend and slower.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_id = device_id_of(device)
    gpu = device_id is not None
    resize = resize or default_resize(gpu=gpu, train=train)
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if resize != "dali" and train:
        raise ValueError(f"resize={resize!r} is for eval loaders: training resizes its random crops in DALI")
    if expected_size is not None and tuple(expected_size) != spec.output_size:
        raise ValueError(f"the model expects {tuple(expected_size)} images but {spec.processor} "
                         f"produces {spec.output_size}; use the model's own processor")
    info = preflight(data=Path(data), split=split, world_size=world_size, batch_size=batch_size, train=train,
                     hash_share=(rank, world_size) if verify_hashes else None)
    tars = [str(Path(data) / split / r["name"]) for r in info["shards"]]
    pipe = shard_pipeline(
        tars=tars, indexes=[str(Path(data) / split / r["index"]) for r in info["shards"]], spec=spec, train=train, gpu=gpu,
        shard_id=rank, num_shards=world_size, layout="HWC" if channels_last else "CHW",
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT, augment=augment or {},
        batch_size=batch_size, num_threads=num_threads or len(os.sched_getaffinity(0)),
        device_id=device_id, seed=seed + rank,
        enable_checkpointing=True, checkpoint=(state or {}).get("dali"), prefetch_queue_depth=2,
        # only automatic augmentation branches; AutoGraph's rewrite of the graph is otherwise wasted
        enable_conditionals=bool((augment or {}).get("auto_augment")),
        decode_only=resize != "dali",
    )
    pipe.build()
    return DaliLoader(pipe, tars=tars, samples=info["samples"], batch_size=batch_size, rank=rank, world_size=world_size,
                      train=train, device=device, dtype=dtype, channels_last=channels_last, state=state,
                      spec=spec, resize=resize)


class DaliLoader:
    """Iterates one epoch per `iter()`; `len()` is the batches per epoch, equal on every rank."""

    def __init__(self, pipe, *, tars: list[str], samples: int, batch_size: int, rank: int, world_size: int, train: bool,
                 device: torch.device, dtype: torch.dtype, channels_last: bool, state: dict | None,
                 spec: PreprocessSpec, resize: str):
        self.pipe, self.tars, self.samples, self.batch_size = pipe, tars, samples, batch_size
        self.spec, self.resize = spec, resize
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        # this rank's part, by DALI's own split rule
        self.rank_samples = (rank + 1) * samples // world_size - rank * samples // world_size
        self.reader_batches = math.ceil(self.rank_samples / batch_size)  # one reader epoch (padded)
        if train:
            self.steps = (samples // world_size) // batch_size
        else:
            self.steps = math.ceil(math.ceil(samples / world_size) / batch_size)
        self.epoch = (state or {}).get("epoch", 0)
        self.step = (state or {}).get("step", 0)  # batches of the current epoch already returned
        self.read = (state or {}).get("read", 0)  # reader batches of the current epoch consumed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        while self.step < self.steps:
            valid = min(self.batch_size, max(0, self.rank_samples - self.step * self.batch_size))
            if self.read < self.reader_batches:
                batch = self._next_batch()
            else:  # eval only: this rank's data is done but others' is not; a fully masked batch
                batch = dict(self._last)
            batch["mask"] = torch.arange(self.batch_size, device=self.device) < valid
            self._last = batch
            self.step += 1
            yield batch
        while self.read < self.reader_batches:  # drop the rest of the reader's epoch
            self._run()
        self.epoch, self.step, self.read = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        """Where this loader stands: epoch, step, and DALI's reader position and RNG state."""
        return {"epoch": self.epoch, "step": self.step, "read": self.read, "dali": self.pipe.checkpoint()}

    def _run(self):
        try:
            outputs = self.pipe.run()
        except RuntimeError as e:
            # DALI's message names the operator, not the sample: find the sample ourselves
            found = find_undecodable(self.tars)
            where = f"shard {found[0]}, sample {found[1]}: {found[2]}" if found else "no sample fails to decode with Pillow"
            raise DataError(f"{where}; DALI: {_first_error_line(str(e))}") from e
        self.read += 1
        return outputs

    def _next_batch(self) -> dict:
        images, labels = self._run()
        keys = [sample_key_of(images[i].source_info()) for i in range(len(images))]
        labels = parse_labels(np.asarray(labels.as_tensor())).to(self.device)
        if self.resize != "dali":  # decoded images of any size, resized one by one in torch
            pixels = torch.stack([eval_image(self._sample(images[i]), self.spec, self.resize)
                                  for i in range(len(images))])
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return {"pixel_values": pixels.to(self.dtype), "labels": labels, "keys": keys}
        images = images.as_tensor()
        pixels = torch.empty(images.shape(), dtype=torch.float16 if self.dtype == torch.float16 else torch.float32,
                             device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(images, pixels, cuda_stream=stream)
        if self.channels_last:  # DALI wrote NHWC: the same memory is NCHW in channels_last layout
            pixels = pixels.permute(0, 3, 1, 2)
        return {"pixel_values": pixels.to(self.dtype), "labels": labels, "keys": keys}

    def _sample(self, image) -> torch.Tensor:
        """One DALI sample (CPU or GPU) as a torch tensor on this loader's device."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.asarray(image))
        out = torch.empty(image.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(image, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out


def sample_key_of(source_info: str) -> str:
    """The sample key in DALI's source info `path/shard.tar:offset:key.ext`."""
    return source_info.rsplit(":", 1)[-1].split(".", 1)[0]


def parse_labels(padded: np.ndarray) -> torch.Tensor:
    """(N, LABEL_BYTES) zero-padded ASCII decimals -> (N,) int64."""
    values = np.zeros(len(padded), dtype=np.int64)
    for column in padded.T:
        digit = column != 0
        values = np.where(digit, values * 10 + (column.astype(np.int64) - 48), values)
    return torch.from_numpy(values)


def _first_error_line(message: str) -> str:
    lines = [l.strip() for l in message.splitlines() if l.strip() and "pipeline" not in l.lower() and not l.startswith(" ")]
    return lines[-1] if lines else "error"
