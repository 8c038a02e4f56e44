"""How closely the DALI eval pipeline reproduces a Hugging Face image processor.

    python tools/check_parity.py --processor NAME_OR_DIR --images DIR [--device cpu|gpu]
                                 [--resize dali|torch|pillow]
    python tools/check_parity.py --decoder-only --images DIR [--device cpu|gpu]
    python tools/check_parity.py --all --images DIR [--device cpu|gpu] [--families vit clip ...]

Runs the eval pipeline and the processor's PIL backend (the reference) on the same image files
and prints, per image and overall, the difference in 0-255 grey levels (|a - b| x std x 255):
mean, 99th percentile, max, and max away from the border (3 pixels in from each edge). The last
line is one JSON object with the overall figures. `--resize` picks the eval resize as
`create_loader(resize=...)` does (default: the loader's default for the device).
`--decoder-only` compares DALI's decoded RGB pixels with Pillow's decode instead (no processor):
which part of a difference the decoder makes, and which the resize. `--all` does both for every
processor family the pipeline supports (FAMILIES) under every resize, and the decoder on GPU also
with every JPEG on the hardware decoder and none, and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.dali import Decoding, NoGPUError, device_id_of, file_pipeline
from pipelines.loader import RESIZES, default_resize
from pipelines.resize import eval_batch
from pipelines.spec import ProcessorError, load_processor, spec_from_processor

BORDER = 3
FAMILIES = {  # name: the processor (PIL backend) of each family the eval pipeline reproduces
    "vit": lambda T: T.ViTImageProcessorPil(),
    "deit": lambda T: T.DeiTImageProcessorPil(),
    "convnext-crop-pct": lambda T: T.ConvNextImageProcessorPil(size={"shortest_edge": 224}),
    "convnext-384": lambda T: T.ConvNextImageProcessorPil(),
    "beit": lambda T: T.BeitImageProcessorPil(),
    "bit": lambda T: T.BitImageProcessorPil(),
    "clip": lambda T: T.CLIPImageProcessorPil(),
    "siglip": lambda T: T.SiglipImageProcessorPil(),
    "mobilenet-v2": lambda T: T.MobileNetV2ImageProcessorPil(),
    "levit": lambda T: T.LevitImageProcessorPil(),
    "efficientnet-bicubic": lambda T: T.EfficientNetImageProcessorPil(),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def reference_processor(processor):
    """The PIL-backend twin of a processor (transformers' reference implementation)."""
    import transformers

    name = type(processor).__name__.removesuffix("Pil").removesuffix("Fast")
    pil_class = getattr(transformers, f"{name}Pil", None)
    if pil_class is None or isinstance(processor, pil_class):
        return processor
    return pil_class(**processor.to_dict())


def grey_level_differences(processor, files: list[Path], *, gpu: bool = False, resize: str = "dali") -> list[np.ndarray]:
    """Per file, |DALI - processor| in 0-255 grey levels, shaped (3, H, W). `resize` as in
    `create_loader`: "dali" in the graph; "torch" or "pillow" after DALI's decoder, on the same device."""
    spec = spec_from_processor(processor)
    reference = reference_processor(processor)
    device = "cuda" if gpu else "cpu"
    pipe = file_pipeline(files=[str(f) for f in files], spec=spec, gpu=gpu, batch_size=len(files),
                         num_threads=2, device_id=device_id_of(device), decode_only=resize != "dali")
    pipe.build()
    (images,) = pipe.run()
    if gpu:
        images = images.as_cpu()
    if resize != "dali":
        # the loader's own call: batched matrix products on GPU, image by image on CPU
        batch = eval_batch([torch.from_numpy(np.array(images.at(i))).to(device) for i in range(len(files))], spec, resize)
        outputs = list(batch.cpu().numpy())
    else:
        outputs = [np.asarray(images.at(i)) for i in range(len(files))]
    std = np.asarray(spec.std, dtype=np.float64)[:, None, None]
    differences = []
    for path, output in zip(files, outputs):
        expected = reference(Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"][0]
        difference = np.abs(np.asarray(output, dtype=np.float64) - expected) * std * 255
        # both sides are float32 images of 8-bit levels: 1 level reads as 1.0000075; drop that noise
        differences.append(np.round(difference, 3))
    return differences


def decoder_differences(files: list[Path], *, gpu: bool = False, hw_decoder_load: float | None = None) -> list[np.ndarray]:
    """Per file, |DALI's decoded RGB - Pillow's| in grey levels, shaped (3, H, W); on GPU
    `hw_decoder_load` splits the JPEGs between the hardware decoder and CUDA (None: DALI's default)."""
    pipe = file_pipeline(files=[str(f) for f in files], spec=None, gpu=gpu, batch_size=len(files), num_threads=2,
                         device_id=device_id_of("cuda" if gpu else "cpu"), decode_only=True,
                         decoding=Decoding(hw_decoder_load=hw_decoder_load))
    pipe.build()
    (images,) = pipe.run()
    if gpu:
        images = images.as_cpu()
    return [np.abs(np.asarray(images.at(i), dtype=np.int16) - np.asarray(Image.open(path).convert("RGB"), dtype=np.int16))
            .transpose(2, 0, 1).astype(np.float64) for i, path in enumerate(files)]


def summarize(differences: list[np.ndarray]) -> dict:
    values = np.concatenate([d.ravel() for d in differences])
    return {
        "mean": float(values.mean()),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
        "max_interior": float(max(d[:, BORDER:-BORDER, BORDER:-BORDER].max() for d in differences)),
        "images": len(differences),
    }


def parity_table(files: list[Path], *, gpu: bool, families: list[str]) -> dict:
    """{"decoder": {split: figures}, "families": {family: {resize: figures}}}: the decoder alone
    (on GPU also with every JPEG on the hardware decoder, and none), every family and resize."""
    import transformers

    splits = {"default": None, **({"hardware (hw_decoder_load 1)": 1.0, "CUDA (hw_decoder_load 0)": 0.0} if gpu else {})}
    table = {"decoder": {name: summarize(decoder_differences(files, gpu=gpu, hw_decoder_load=load))
                         for name, load in splits.items()}, "families": {}}
    for name in families:
        processor = FAMILIES[name](transformers)
        table["families"][name] = {resize: summarize(grey_level_differences(processor, files, gpu=gpu, resize=resize))
                                   for resize in RESIZES}
    return table


def markdown(table: dict) -> str:
    cell = lambda f: f"{f['mean']:.3f} / {f['p99']:g} / {f['max']:g}"  # noqa: E731
    images = next(iter(table["decoder"].values()))["images"]
    lines = [f"Grey levels, mean / p99 / max, {images} images.", "", "| decoder alone, against Pillow's decode | |",
             "| --- | --- |", *(f"| {name} | {cell(f)} |" for name, f in table["decoder"].items()), "",
             "| processor | " + " | ".join(f"`{r}` resize" for r in RESIZES) + " |", "| --- |" + " --- |" * len(RESIZES)]
    for name, row in table["families"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row[r]) for r in RESIZES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processor", help="hub name or folder with preprocessor_config.json")
    parser.add_argument("--images", required=True, type=Path, help="folder of image files")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--resize", choices=RESIZES, help="eval resize (default: torch on cpu, dali on gpu)")
    parser.add_argument("--decoder-only", action="store_true", help="compare the decoded pixels with Pillow's decode")
    parser.add_argument("--all", action="store_true", help="every family under every resize, and the decoder alone")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="with --all")
    args = parser.parse_args(argv)
    if not args.processor and not args.decoder_only and not args.all:
        parser.error("--processor is required (or --decoder-only, or --all)")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(f"check_parity: error: no image files in {args.images}", file=sys.stderr)
        return 2
    gpu = args.device == "gpu"
    try:
        if args.all:
            table = parity_table(files, gpu=gpu, families=args.families)
            print(markdown(table))
            print(json.dumps(table))
            return 0
        if args.decoder_only:
            differences = decoder_differences(files, gpu=gpu)
        else:
            differences = grey_level_differences(load_processor(args.processor), files, gpu=gpu,
                                                 resize=args.resize or default_resize(gpu=gpu, train=False))
    except (ProcessorError, NoGPUError) as e:
        print(f"check_parity: error: {e}", file=sys.stderr)
        return 2
    print(f"{'image':<40} {'mean':>7} {'p99':>7} {'max':>7} {'max_interior':>13}")
    for path, diff in zip(files, differences):
        row = summarize([diff])
        print(f"{path.name[-40:]:<40} {row['mean']:7.3f} {row['p99']:7.2f} {row['max']:7.2f} {row['max_interior']:13.2f}")
    print(json.dumps(summarize(differences)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
