"""The data side of a run besides the DALI loaders: the built-in default shards, and the
synthetic stand-in for the train loader."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_SHARDS_PER_FILE = 20  # small shards, so that up to 9 ranks each get a val shard


def cache_dir() -> Path:
    """$DDV_CACHE_DIR, else dali-deepspeed-vision/ in the user's cache folder."""
    if os.environ.get("DDV_CACHE_DIR"):
        return Path(os.environ["DDV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dali-deepspeed-vision"


def builtin_digits(*, local_rank: int) -> Path:
    """scikit-learn's digits as shards in the cache folder, built once per machine by
    tools/make_shards.py; other ranks wait for it."""
    out = cache_dir() / "digits"
    if local_rank == 0 and not (out / "manifest.json").is_file():
        tmp = out.with_name(f"digits.tmp{os.getpid()}")
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "sklearn:digits", str(tmp),
                        "--max-count", str(BUILTIN_SHARDS_PER_FILE), "--workers", "1", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            os.rename(tmp, out)
        except OSError:  # another node on this machine built it first
            shutil.rmtree(tmp)
    dist.barrier()
    return out


class SyntheticLoader:
    """Stands in for the train loader with one batch made once, already on the device: the
    input-bound ceiling that tools/benchmark_train.py compares the DALI-fed run against."""

    def __init__(self, like, *, num_classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        batch = next(iter(like))  # the real loader's shapes, dtype, layout and device
        self.steps, self.batch = len(like), {
            "pixel_values": torch.randn(batch["pixel_values"].shape, generator=generator).to(batch["pixel_values"]),
            "labels": torch.randint(num_classes, batch["labels"].shape, generator=generator).to(batch["labels"]),
            "keys": batch["keys"],
        }
        if batch["pixel_values"].is_contiguous(memory_format=torch.channels_last):
            self.batch["pixel_values"] = self.batch["pixel_values"].contiguous(memory_format=torch.channels_last)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch

    def state_dict(self, *, accum: int = 1) -> dict:
        return {}


class BaselineLoader:
    """`--baseline_loader`: the train loader a Hugging Face user runs today, for benchmarks: the
    shards read with `webdataset` (shards resampled, a shuffle buffer), each image through the
    model's image processor (its PIL backend) in a torch DataLoader with one worker per core of
    this rank. Processor preprocessing only (no random crop or flip), no exact resume; the same
    number of batches per epoch as the DALI loader it stands in for, so the schedule is the same."""

    SHUFFLE = 1000

    def __init__(self, like, *, data: Path, processor, batch_size: int, workers: int, seed: int,
                 device: torch.device, dtype: torch.dtype, channels_last: bool):
        import webdataset as wds

        self.steps, self.device, self.dtype, self.channels_last = len(like), device, dtype, channels_last
        tars = [str(p) for p in sorted((Path(data) / "train").glob("*.tar"))]
        # every rank draws shards at random from all of them, seeded by its rank (webdataset's
        # recipe for many nodes): no shard count to match to the ranks
        dataset = (wds.WebDataset(tars, resampled=True, shardshuffle=False, seed=seed, empty_check=False,
                                  nodesplitter=None)
                   .shuffle(self.SHUFFLE, seed=seed).decode("pil")
                   .map(_Preprocess(processor)).batched(batch_size, partial=False))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  pin_memory=device.type == "cuda",
                                                  persistent_workers=workers > 0,
                                                  prefetch_factor=4 if workers else None,
                                                  worker_init_fn=_default_sigterm)
        self.batches = iter(self.loader)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            pixels, labels, keys = next(self.batches)
            pixels = pixels.to(self.device, non_blocking=True).to(self.dtype)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            yield {"pixel_values": pixels, "labels": labels, "keys": list(keys),
                   "mask": torch.ones(len(labels), dtype=torch.bool, device=self.device)}

    def state_dict(self, *, accum: int = 1) -> dict:
        return {}


class _Preprocess:
    """A webdataset sample to (pixels, label, key) with the processor (picklable for the workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, sample: dict):
        pixels = self.processor(sample["jpg"].convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return pixels, int(sample["cls"]), sample["__key__"]


def _default_sigterm(worker_id: int) -> None:
    """A worker dies of SIGTERM as processes do: the rank's own handler (train/main.py) is for the rank."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
