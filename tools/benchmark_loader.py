"""Images/s of the DALI loaders against the HF processor in a PyTorch DataLoader.

    python tools/benchmark_loader.py [--data OUT | --images N] [--processor NAME_OR_DIR] [--device cpu|gpu]

Both read the same shards (`--data`, or N ImageNet-like 500x375 JPEGs cut from real photos, built
in a temporary folder; on a GPU take more than the default 1200), on the same cores, in the same
run: the DALI train and eval loaders (the objects training iterates; the eval loader with each
resize: DALI's, torch's, Pillow's exact), the baseline users have today (`webdataset` + the
processor's PIL backend in a DataLoader with as many workers as DALI has threads), and the train
and eval loaders' own DALI graphs run alone, outputs left in DALI (each loader's ceiling); on a GPU
also the train loader with libjpeg-turbo's chroma upsampling (what Pillow's pixels would cost
training's decoder), and the `torch` and `pillow` resizes in the batched arithmetic the GPU does
not default to (float64 where float64 is slow, float32 bytes where it is fast). Prints a table and
writes a bar chart to `--chart`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipelines.dali import Decoding, NoGPUError, device_id_of
from pipelines.loader import RESIZES, create_loader
from pipelines.shards import load_manifest
from pipelines.spec import ProcessorError, load_processor, spec_from_processor


class TooFewBatches(ValueError):
    """An epoch of one batch: nothing is left to time after the start-up batch."""


def time_epoch(batches) -> float:
    """Images/s over one pass, the first batch (pipeline start-up) excluded."""
    iterator = iter(batches)
    next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["pixel_values"])
    if not count:
        raise TooFewBatches("an epoch of one batch leaves nothing to time after the start-up batch")
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU batches are copied asynchronously
    return count / (time.perf_counter() - start)


def hf_baseline(tars: list[str], processor, *, batch_size: int, workers: int, samples: int):
    """The processor in a DataLoader over webdataset, `samples` images' worth of batches. Every
    worker draws whole shards at random from all of them (webdataset's resampling, as the trainer's
    --baseline_loader does): split by shard instead, a split of fewer shards than workers would
    leave workers idle and understate the baseline."""
    import webdataset as wds

    def preprocess(sample):
        pixels = processor(sample["jpg"].convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": sample["cls"]}

    dataset = wds.WebDataset(tars, resampled=True, shardshuffle=False, empty_check=False, nodesplitter=_every_shard)
    dataset = dataset.decode("pil").map(preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return itertools.islice(loader, math.ceil(samples / batch_size))


def _every_shard(urls):
    return urls


def graph_alone(loader):
    """The loader's own DALI pipeline, run without handing its outputs to torch: the ceiling of
    that loader (its reading, decoding and augmentation, with nothing after). A separate decode-only
    pipeline was no ceiling on GPU (15,530 img/s against 25,420 for the train loader, whose decoder
    decodes only the random crop)."""
    for _ in range(len(loader)):
        outputs = loader.pipe.run()
        yield {"pixel_values": range(len(outputs[0]))}


def other_arithmetic(common: dict) -> dict[str, float]:
    """The eval loaders with the `torch` and `pillow` resizes, their batched passes in the
    arithmetic the device does not default to (float64 or float32 bytes; pipelines/resize.py)."""
    from pipelines import resize

    wide = not resize._float64_is_fast(torch.device(common["device"]))
    rows = {}
    resize.FLOAT64 = wide
    try:
        for name in ("torch", "pillow"):
            rows[f"DALI eval loader, {name} resize, {'float64' if wide else 'float32 bytes'}"] = time_epoch(
                create_loader(train=False, resize=name, **common))
    finally:
        resize.FLOAT64 = None
    return rows


def time_loaders(tars: list[str], processor, *, common: dict, workers: int, samples: int) -> dict[str, float]:
    """Images/s of each loader over the split in `common` (of `samples` images), in the table's order."""
    gpu = common["device"] == "cuda"
    rows = {
        "HF processor DataLoader": time_epoch(hf_baseline(tars, processor, batch_size=common["batch_size"],
                                                          workers=workers, samples=samples)),
        **{f"DALI eval loader, {resize} resize": time_epoch(create_loader(train=False, resize=resize, **common))
           for resize in RESIZES},
        "DALI train loader": time_epoch(create_loader(train=True, **common)),
        # what libjpeg-turbo's chroma upsampling (Pillow's pixels) would cost training's decoder
        **({"DALI train loader, fancy upsampling": time_epoch(create_loader(
            train=True, decoding=Decoding(fancy_upsampling=True), **common))} if gpu else {}),
        "DALI eval graph alone": time_epoch(graph_alone(create_loader(train=False, resize="dali", **common))),
        "DALI train graph alone": time_epoch(graph_alone(create_loader(train=True, **common))),
    }
    if gpu:  # where the eval resizes are batched
        rows.update(other_arithmetic(common))
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
    parser.add_argument("--split", default="val", help="the split timed (every loader reads it once or more)")
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
        try:
            rows = time_loaders(tars, processor, common=common, workers=args.threads,
                                samples=load_manifest(data)["splits"][args.split]["samples"])
        except TooFewBatches as e:
            parser.error(f"{e}: the {args.split} split of {data} is too small for --batch-size {args.batch_size}; "
                         f"pass a smaller batch, a larger split (--split train) or more --images")
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
