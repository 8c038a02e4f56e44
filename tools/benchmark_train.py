"""Training images/s fed by the DALI loader, by the loader Hugging Face users run today, and by
synthetic tensors (the ceiling), same trainer, same data, same run.

    python tools/benchmark_train.py [--data OUT] [--images N] [--steps N] [--micro_batch_size N]
                                    [--models ...] [--json FILE] [train/main.py arguments ...]

For each model, built from config at 224 px, train/main.py runs three times under the deepspeed
launcher: on the DALI loader; with `--baseline_loader` (webdataset + the model's HF processor in a
torch DataLoader, one worker per core); with `--synthetic_data` (one batch made once, already on
the device: the ceiling when input costs nothing). Each row: images/s (median of the logged
intervals after the first), each loader's share of the ceiling, perf/data_wait_fraction and, on a
GPU with a known peak, perf/mfu. Defaults follow the device: on a GPU ViT-B/16 and ResNet-50 at
micro batch 256 (ResNet channels-last), 60 steps, 8,000 images; on CPU ViT-Tiny/16 and ResNet-18 at
16, 30 steps, 1,000 images. Arguments it does not know go to train/main.py (e.g. --compile).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark_shards import write_imagenet_like
from make_shards import make_shards

ROOT = Path(__file__).resolve().parents[1]
VIT = {"model_type": "vit", "image_size": 224, "patch_size": 16}
RESNET = {"model_type": "resnet", "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512]}
MODELS = {  # name: (config, processor, trainer arguments on a GPU)
    "vit-tiny": ({**VIT, "hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                  "intermediate_size": 768}, lambda T: T.ViTImageProcessorPil(), []),
    "resnet-18": ({**RESNET, "depths": [2, 2, 2, 2], "layer_type": "basic"},
                  lambda T: T.ConvNextImageProcessorPil(size={"shortest_edge": 224}), ["--channels_last"]),
    "vit-b16": ({**VIT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072}, lambda T: T.ViTImageProcessorPil(), []),
    "resnet-50": ({**RESNET, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
                   "layer_type": "bottleneck"},
                  lambda T: T.ConvNextImageProcessorPil(size={"shortest_edge": 224}), ["--channels_last"]),
}
DEFAULTS = {True: {"models": ["vit-b16", "resnet-50"], "micro": 256, "steps": 60, "images": 8000},
            False: {"models": ["vit-tiny", "resnet-18"], "micro": 16, "steps": 30, "images": 1000}}
LOADERS = {"dali": [], "baseline": ["--baseline_loader"], "synthetic": ["--synthetic_data"]}


class RunFailed(RuntimeError):
    """A training run failed, timed out, or logged too few intervals to measure."""


def run_training(*, data: Path, work: Path, name: str, loader: str = "dali", config: str = "zero2", steps: int,
                 micro: int, ranks: int = 1, port: int, extra: list[str] = (), timeout: float | None = None) -> dict:
    """images/s (median of the logged intervals after the first), data wait fraction, MFU, peak
    GPU memory and output dir of one train/main.py run of model `name` (its config and processor in
    `work`)."""
    out = work / "-".join([name, loader, config, str(micro), *(a.lstrip("-") for a in extra)])
    command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "train" / "main.py"),
               "--ds_config", str(ROOT / "ds_configs" / f"{config}.json"), "--data", str(data),
               "--model_config", str(work / f"{name}.json"), "--processor", str(work / f"{name}-processor"),
               "--output_dir", str(out), "--max_steps", str(steps), "--micro_batch_size", str(micro),
               "--log_steps", "5", "--eval_steps", str(10**9), "--save_steps", "0", "--wandb_mode", "disabled",
               *LOADERS[loader], *extra]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed("timed out") from None
    if done.returncode != 0:
        raise RunFailed(f"failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/images_per_sec" in r][1:]  # the first interval includes start-up
    if not rows:
        raise RunFailed("logged one interval; pass more --steps")
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
    return {"images_per_sec": statistics.median(r["perf/images_per_sec"] for r in rows),
            "data_wait": statistics.mean(r["perf/data_wait_fraction"] for r in rows),
            "mfu": statistics.median(mfu) if mfu else None,
            "gpu_mem_gib": max((r.get("perf/gpu_mem") or 0 for r in rows), default=0) or None, "output_dir": str(out)}


def table(results: dict) -> str:
    """One row per model; "-" for a loader not run (--loaders) and an MFU without a known peak."""
    lines = ["| model | DALI img/s | baseline img/s | synthetic img/s | DALI / synthetic | baseline / synthetic "
             "| DALI data wait | baseline data wait | MFU (DALI) | MFU (synthetic) |", "|" + " --- |" * 10]
    shown = lambda value, form: "-" if value is None or math.isnan(value) else format(value, form)  # noqa: E731
    for name, r in results.items():
        ceiling = r["synthetic"]["images_per_sec"]
        lines.append(f"| {name} | {shown(r['dali']['images_per_sec'], '.1f')} | "
                     f"{shown(r['baseline']['images_per_sec'], '.1f')} | {ceiling:.1f} | "
                     f"{shown(r['dali']['images_per_sec'] / ceiling, '.1%')} | "
                     f"{shown(r['baseline']['images_per_sec'] / ceiling, '.1%')} | "
                     f"{shown(r['dali']['data_wait'], '.3f')} | {shown(r['baseline']['data_wait'], '.3f')} | "
                     f"{shown(r['dali']['mfu'], '.1%')} | {shown(r['synthetic']['mfu'], '.1%')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    gpu = torch.cuda.is_available()
    defaults = DEFAULTS[gpu]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="shards (default: ImageNet-like 500x375 JPEGs, built here)")
    parser.add_argument("--images", type=int, default=defaults["images"], help="images to build without --data")
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps per run")
    parser.add_argument("--micro_batch_size", type=int, default=defaults["micro"])
    parser.add_argument("--ranks", type=int, default=1, help="ranks per run (--num_gpus of the launcher)")
    parser.add_argument("--models", nargs="+", default=defaults["models"], choices=list(MODELS))
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args, extra = parser.parse_known_args(argv)  # the rest goes to train/main.py (e.g. --data_threads 1)
    if "synthetic" not in args.loaders:
        parser.error("--loaders needs synthetic: it is what the others are compared with")
    import transformers

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            write_imagenet_like(work / "images", args.images)
            make_shards(src=work / "images", out=work / "shards", val_fraction=0.05, max_count=1000, progress=False)
            data = work / "shards"
        for n, name in enumerate(args.models):
            config, processor, gpu_args = MODELS[name]
            (work / f"{name}.json").write_text(json.dumps(config))
            processor(transformers).save_pretrained(work / f"{name}-processor")
            try:
                results[name] = {loader: run_training(data=data, work=work, name=name, loader=loader, steps=args.steps,
                                                      micro=args.micro_batch_size, ranks=args.ranks,
                                                      port=29700 + 3 * n + i, extra=(gpu_args if gpu else []) + extra)
                                 for i, loader in enumerate(args.loaders)}
            except RunFailed as e:
                sys.exit(f"benchmark_train: {name}: {e}")
            for figures in results[name].values():
                figures.pop("output_dir")  # in the temporary folder, gone once this tool ends
            for loader in set(LOADERS) - set(args.loaders):
                results[name][loader] = {"images_per_sec": float("nan"), "data_wait": float("nan"), "mfu": None}
            print(f"{name}: " + ", ".join(f"{loader} {r['images_per_sec']:.1f} img/s"
                                          for loader, r in results[name].items()), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"device": "cuda" if gpu else "cpu", "micro_batch_size": args.micro_batch_size,
                                         "steps": args.steps, "ranks": args.ranks, "extra": extra,
                                         "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
