"""Training images/s fed by the DALI loader against the same run fed by synthetic tensors.

    python tools/benchmark_train.py [--data OUT] [--images 1000] [--steps 30] [--ranks 1]

For a ViT and a ResNet from config (ViT-Tiny/16 and ResNet-18 sizes, 224 px, as in ImageNet
training) it runs train/main.py twice under the deepspeed launcher, same data, same cores: once on
the DALI loader, once with `--synthetic_data` (one batch made once, already on the device: the
ceiling when input costs nothing). It reports images/s (median of the logged intervals after the
first) and perf/data_wait_fraction from each run's metrics.jsonl, and the DALI-fed run's share of
the ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark_shards import write_imagenet_like
from make_shards import make_shards

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "vit-tiny": ({"model_type": "vit", "image_size": 224, "patch_size": 16, "hidden_size": 192,
                  "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
                 lambda T: T.ViTImageProcessorPil()),
    "resnet-18": ({"model_type": "resnet", "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512],
                   "depths": [2, 2, 2, 2], "layer_type": "basic"},
                  lambda T: T.ConvNextImageProcessorPil(size={"shortest_edge": 224})),
}


def run_training(*, data: Path, work: Path, name: str, synthetic: bool, steps: int, micro: int, ranks: int,
                 port: int, extra: list[str]) -> dict:
    """images/s and data wait fraction of one train/main.py run."""
    out = work / f"{name}-{'synthetic' if synthetic else 'dali'}"
    command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "train" / "main.py"),
               "--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--data", str(data),
               "--model_config", str(work / f"{name}.json"), "--processor", str(work / f"{name}-processor"),
               "--output_dir", str(out), "--max_steps", str(steps), "--micro_batch_size", str(micro),
               "--log_steps", "5", "--eval_steps", str(10**9), "--save_steps", str(10**9), "--wandb_mode", "disabled",
               *(["--synthetic_data"] if synthetic else []), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark_train: {name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/images_per_sec" in r][1:]  # the first interval includes start-up
    return {"images_per_sec": statistics.median(r["perf/images_per_sec"] for r in rows),
            "data_wait": statistics.mean(r["perf/data_wait_fraction"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="shards (default: ImageNet-like 500x375 JPEGs, built here)")
    parser.add_argument("--images", type=int, default=1000, help="images to build when --data is not given")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=1, help="ranks per run (--num_gpus of the launcher)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args, extra = parser.parse_known_args(argv)  # the rest goes to train/main.py (e.g. --data_threads 1)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            write_imagenet_like(work / "images", args.images)
            make_shards(src=work / "images", out=work / "shards", val_fraction=0.05, max_count=100, progress=False)
            data = work / "shards"
        print(f"{'model':<10} {'DALI img/s':>11} {'synthetic img/s':>16} {'share':>7} {'data wait':>10}")
        for n, name in enumerate(args.models):
            config, processor = MODELS[name]
            (work / f"{name}.json").write_text(json.dumps(config))
            processor(transformers).save_pretrained(work / f"{name}-processor")
            results = {synthetic: run_training(data=data, work=work, name=name, synthetic=synthetic, steps=args.steps,
                                               micro=args.micro_batch_size, ranks=args.ranks, port=29700 + 2 * n + synthetic,
                                               extra=extra)
                       for synthetic in (False, True)}
            dali, ceiling = results[False], results[True]
            print(f"{name:<10} {dali['images_per_sec']:>11.1f} {ceiling['images_per_sec']:>16.1f} "
                  f"{dali['images_per_sec'] / ceiling['images_per_sec']:>7.1%} {dali['data_wait']:>10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
