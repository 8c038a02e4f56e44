"""Images/s of the DALI loaders against the HF processor in a PyTorch DataLoader.

    python tools/benchmark_loader.py [--data OUT | --images N] [--processor NAME_OR_DIR] [--device cpu|gpu]
                                     [--split val|train] [--batch-size 32] [--batches 40]

Both read the same shards (`--data`, or N ImageNet-like 500x375 JPEGs cut from real photos, built
in a temporary folder; on a GPU take more than the default 1200), on the same cores, in the same
run: the DALI train and eval loaders (the objects training iterates; the eval loader with each
resize: DALI's, torch's, Pillow's exact), the baseline users have today (`webdataset` + the
processor's PIL backend in a DataLoader with as many workers as DALI has threads), and the train
and eval loaders' own DALI graphs run alone, outputs left in DALI (each loader's ceiling); on a GPU
also the train loader with libjpeg-turbo's chroma upsampling (what Pillow's pixels would cost
training's decoder), and the `torch` and `pillow` resizes in the batched arithmetic the GPU does
not default to (float64 where float64 is slow, float32 bytes where it is fast). Each is timed in
its steady state: `--batches` batches after a warm-up that covers start-up and what was queued
meanwhile (DALI's prefetch queue; two batches per DataLoader worker, which all arrive at once),
over as many epochs of the split as that takes. Prints a table and writes a bar chart to `--chart`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipelines.dali import Decoding, NoGPUError, device_id_of
from pipelines.loader import PREFETCH, RESIZES, create_loader
from pipelines.spec import ProcessorError, load_processor, spec_from_processor


def steady_rate(epoch, *, warmup: int, batches: int) -> float:
    """Images/s over `batches` batches that follow `warmup` ones, iterating `epoch()` (one epoch of
    a loader) as often as that takes. The warm-up covers start-up and the batches queued meanwhile
    (DALI's prefetch queue; the first batches of every DataLoader worker, which all arrive at once)
    so that the rate is the steady one."""
    seen = count = 0
    start = None
    while seen < warmup + batches:
        before = seen
        for batch in epoch():
            seen += 1
            if seen > warmup:
                count += len(batch["pixel_values"])
            elif seen == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # GPU batches are copied asynchronously
                start = time.perf_counter()
            if seen == warmup + batches:
                break
        if seen == before:
            raise ValueError("an epoch without a batch")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def hf_baseline(tars: list[str], processor, *, batch_size: int, workers: int):
    """The processor in a DataLoader over webdataset, batches without end. Every worker draws whole
    shards at random from all of them (webdataset's resampling, as the trainer's --baseline_loader
    does): split by shard instead, a split of fewer shards than workers would leave workers idle
    and understate the baseline."""
    import webdataset as wds

    def preprocess(sample):
        pixels = processor(sample["jpg"].convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": sample["cls"]}

    dataset = wds.WebDataset(tars, resampled=True, shardshuffle=False, empty_check=False, nodesplitter=None)
    dataset = dataset.decode("pil").map(preprocess)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def hf_rate(tars: list[str], processor, *, batch_size: int, workers: int, batches: int) -> float:
    """steady_rate of hf_baseline; its workers stop on return."""
    endless = iter(hf_baseline(tars, processor, batch_size=batch_size, workers=workers))
    # every worker's first batches (prefetch_factor 2 each) arrive together: the warm-up
    return steady_rate(lambda: endless, warmup=2 * max(workers, 1), batches=batches)


def graph_alone(loader):
    """The loader's own DALI pipeline, run without handing its outputs to torch: the ceiling of
    that loader (its reading, decoding and augmentation, with nothing after). A separate decode-only
    pipeline was no ceiling on GPU (15,530 img/s against 25,420 for the train loader, whose decoder
    decodes only the random crop)."""
    for _ in range(len(loader)):
        outputs = loader.pipe.run()
        yield {"pixel_values": range(len(outputs[0]))}


def other_arithmetic(common: dict, *, batches: int) -> dict[str, float]:
    """The eval loaders with the `torch` and `pillow` resizes, their batched passes in the
    arithmetic the device does not default to (float64 or float32 bytes; pipelines/resize.py)."""
    from pipelines import resize

    wide = not resize._float64_is_fast(torch.device(common["device"]))
    rows = {}
    resize.FLOAT64 = wide
    try:
        for name in ("torch", "pillow"):
            rows[f"DALI eval loader, {name} resize, {'float64' if wide else 'float32 bytes'}"] = dali_rate(
                create_loader(train=False, resize=name, **common), batches=batches)
    finally:
        resize.FLOAT64 = None
    return rows


def dali_rate(loader, *, batches: int, alone: bool = False) -> float:
    """steady_rate of a DALI loader, or with `alone` of its own graph (graph_alone)."""
    return steady_rate(lambda: graph_alone(loader) if alone else loader, warmup=PREFETCH + 1, batches=batches)


def time_loaders(tars: list[str], processor, *, common: dict, workers: int, batches: int) -> dict[str, float]:
    """Images/s of each loader over the split in `common`, in the table's order."""
    gpu = common["device"] == "cuda"
    rows = {
        "HF processor DataLoader": hf_rate(tars, processor, batch_size=common["batch_size"], workers=workers,
                                           batches=batches),
        **{f"DALI eval loader, {resize} resize": dali_rate(create_loader(train=False, resize=resize, **common),
                                                           batches=batches) for resize in RESIZES},
        "DALI train loader": dali_rate(create_loader(train=True, **common), batches=batches),
        # what libjpeg-turbo's chroma upsampling (Pillow's pixels) would cost training's decoder
        **({"DALI train loader, fancy upsampling": dali_rate(create_loader(
            train=True, decoding=Decoding(fancy_upsampling=True), **common), batches=batches)} if gpu else {}),
        "DALI eval graph alone": dali_rate(create_loader(train=False, resize="dali", **common), batches=batches,
                                           alone=True),
        "DALI train graph alone": dali_rate(create_loader(train=True, **common), batches=batches, alone=True),
    }
    if gpu:  # where the eval resizes are batched
        rows.update(other_arithmetic(common, batches=batches))
    return rows


def bar_chart(rows: dict[str, float], path: Path) -> None:
    width, bar, pad, left = 860, 34, 10, 330
    img = Image.new("RGB", (width, pad + len(rows) * (bar + pad)), "white")
    draw = ImageDraw.Draw(img)
    top = max(rows.values())
    for i, (name, rate) in enumerate(rows.items()):
        y = pad + i * (bar + pad)
        draw.rectangle([left, y, left + int((width - left - 120) * rate / top), y + bar], fill=(60, 120, 200))
        draw.text((pad, y + bar // 3), name, fill="black")
        draw.text((left + 10 + int((width - left - 120) * rate / top), y + bar // 3), f"{rate:.0f} img/s", fill="black")
    img.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="shards from make_shards (default: build --images ImageNet-like ones)")
    parser.add_argument("--images", type=int, default=1200, help="without --data: images to build, half of them timed")
    parser.add_argument("--processor", help="hub name or folder (default: ViT's 224x224 processor)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", default="val", help="the split read (as many epochs as the timing takes)")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per loader, after its warm-up")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--chart", type=Path, default=Path("benchmark_loader.png"))
    args = parser.parse_args()
    device = "cuda" if args.device == "gpu" else "cpu"
    try:
        device_id_of(device)  # before the minutes spent building data and timing the baseline
    except NoGPUError as e:
        parser.error(str(e))
    if args.processor:
        try:
            processor = load_processor(args.processor)
        except ProcessorError as e:
            parser.error(str(e))
    else:
        from transformers import ViTImageProcessorPil

        processor = ViTImageProcessorPil()
    spec = spec_from_processor(processor)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from benchmark_shards import write_imagenet_like
            from make_shards import make_shards

            write_imagenet_like(Path(tmp) / "src", args.images)
            data = Path(tmp) / "shards"
            make_shards(src=Path(tmp) / "src", out=data, val_fraction=0.5, max_count=100, progress=False)
        tars = [str(p) for p in sorted((data / args.split).glob("*.tar"))]
        common = dict(data=data, split=args.split, spec=spec, batch_size=args.batch_size, num_threads=args.threads,
                      device=device)
        rows = time_loaders(tars, processor, common=common, workers=args.threads, batches=args.batches)
    base = rows["HF processor DataLoader"]
    graphs = {"DALI eval loader, dali resize": "DALI eval graph alone", "DALI train loader": "DALI train graph alone"}
    print(f"{spec.processor} -> {spec.output_size}, {args.device}, {args.threads} threads/workers, batch {args.batch_size}")
    print(f"{'':<48} {'images/s':>9} {'vs HF':>7} {'of its graph':>13}")
    for name, rate in rows.items():
        share = f"{rate / rows[graphs[name]]:>13.0%}" if name in graphs else ""
        print(f"{name:<48} {rate:>9.0f} {rate / base:>6.2f}x {share}")
    bar_chart(rows, args.chart)
    print(f"chart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
