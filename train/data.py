"""The data side of a run besides the DALI loaders: the built-in default shards, and the
synthetic stand-in for the train loader."""

from __future__ import annotations

import os
import shutil
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

    def state_dict(self) -> dict:
        return {}
