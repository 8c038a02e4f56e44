"""make_shards throughput on pass-through JPEGs against the naive re-encoding loop.

    python tools/benchmark_shards.py [--images 2000] [--workers N]

Writes ImageNet-like JPEGs (about 500x375, cut from real photos) into a temporary folder, then
times, in the same run (best of 3 each): the naive loop (Pillow open, convert("RGB"), re-encode at quality 95)
on one core, make_shards with one worker, and make_shards with --workers N. "Per core" is
images per CPU-second, counting the main process and every worker, so the tool's writer
process is not free.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

from make_shards import make_shards


def write_imagenet_like(root: Path, count: int) -> list[Path]:
    from sklearn.datasets import load_sample_images
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), *load_sample_images().images]
    paths = []
    for n in range(count):
        source = photos[n % len(photos)]
        h, w = source.shape[:2]
        top, left = (n * 7) % (h // 4), (n * 13) % (w // 4)
        img = Image.fromarray(source[top : top + 3 * h // 4, left : left + 3 * w // 4])
        size = (500, 375) if n % 3 else (375, 500)
        path = root / f"class_{n % 10}" / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def measure(work, repeats: int = 3) -> tuple[float, float]:
    """Best (images/s, images per CPU-second) of `work()`, which returns how many images it did."""
    rates = []
    for _ in range(repeats):
        cpu, wall = cpu_seconds(), time.perf_counter()
        count = work()
        rates.append((count / (time.perf_counter() - wall), count / (cpu_seconds() - cpu)))
    return max(r[0] for r in rates), max(r[1] for r in rates)


def naive_loop(paths: list[Path]) -> int:
    for path in paths:
        out = io.BytesIO()
        Image.open(path).convert("RGB").save(out, "JPEG", quality=95)
    return len(paths)


def shard(src: Path, out: Path, workers: int) -> int:
    manifest = make_shards(src=src, out=out, workers=workers, progress=False, overwrite=True)
    assert sum(manifest["converted_counts"].values()) == 0, "inputs were meant to pass through"
    return sum(split["samples"] for split in manifest["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        paths = write_imagenet_like(src, args.images)
        naive_loop(paths[:50])  # warm the page cache and the codecs alike for both
        rows = {"naive open+convert+encode": measure(lambda: naive_loop(paths))}
        for workers in sorted({1, args.workers}):
            rows[f"make_shards --workers {workers}"] = measure(lambda: shard(src, Path(tmp) / f"out{workers}", workers))
    naive = rows["naive open+convert+encode"][1]
    print(f"{args.images} pass-through JPEGs, 500x375, {os.cpu_count()} cores")
    print(f"{'':<30} {'images/s':>10} {'per CPU-s':>10} {'vs naive per core':>18}")
    for name, (rate, per_cpu) in rows.items():
        print(f"{name:<30} {rate:>10.0f} {per_cpu:>10.0f} {per_cpu / naive:>17.2f}x")

if __name__ == "__main__":
    main()
