"""What each lever of the input pipeline is worth to training: one process, the trainer's own loop.

    deepspeed --num_gpus 1 tools/benchmark_levers.py --data OUT (--model_config M.json --processor P | --model M)
        [--steps 15] [--rounds 3] [--json FILE] [other train/main.py arguments]

The trainer's `setup` builds the model, the DeepSpeed engine and the loaders once. Then every
variant runs `--steps` optimizer steps of the trainer's loop (`advance`: train_step, NaN guard,
logging), after PREFETCH + 1 warm-up steps that refill its loader's queue, and all that `--rounds`
times, each round in a rotated order, so that clock and cache drift spread over every variant.
Variants: synthetic input already on the device (the ceiling) and the DALI loader, each with the NaN
guard's host sync on every micro batch (`--nan_guard skip`, the default) and without it (`stop`); the
DALI loader with half its threads; on a GPU, with every JPEG on the hardware decoder
(`--hw_decoder_load 1`) and none (`0`), and with libjpeg-turbo's chroma upsampling in training's
decoder (`--train_fancy_upsampling`: Pillow's pixels, at what cost), and with the model on a
high-priority CUDA stream (`--priority_stream`: DALI's kernels fill the gaps); and on synthetic input,
with the weight average updated after every step (`--ema_decay`: what it costs). Each row: images/s (median over the rounds), its share of
the synthetic ceiling under the same guard, and the fraction of the time spent waiting for data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipelines.loader import PREFETCH  # noqa: E402
from train.args import ConfigError, parse_args  # noqa: E402
from train.data import SyntheticLoader  # noqa: E402
from train.distributed import distributed  # noqa: E402
from train.ema import WeightAverage  # noqa: E402
from train.main import advance, compute_stream, create_loaders, new_meter, setup, step_batches  # noqa: E402

EMA_DECAY = 0.9998


def variants(run) -> dict[str, tuple[str, dict]]:
    """name: (its loader's name, the arguments it changes)."""
    threads = run.train_loader.pipe.num_threads
    found = {"synthetic": ("synthetic", {}), "synthetic, nan_guard stop": ("synthetic", {"nan_guard": "stop"}),
             "dali": ("dali", {}), "dali, nan_guard stop": ("dali", {"nan_guard": "stop"}),
             f"synthetic, ema_decay {EMA_DECAY}": ("synthetic", {"ema_decay": EMA_DECAY})}
    if threads > 1:
        found[f"dali, {threads // 2} threads (not {threads})"] = ("half threads", {"data_threads": threads // 2})
    if run.device.type == "cuda":
        for load in (1.0, 0.0):
            found[f"dali, hw_decoder_load {load:g}"] = (f"hw {load:g}", {"hw_decoder_load": load})
        found["dali, train_fancy_upsampling"] = ("fancy", {"train_fancy_upsampling": True})
        found["dali, priority_stream"] = ("dali", {"priority_stream": True})
    return found


def build_loaders(run, chosen: dict[str, tuple[str, dict]]) -> dict:
    """Each variant's loader, built once: the run's own DALI loader, a synthetic one on top of it,
    and a DALI loader of the trainer's for each other setting."""
    loaders = {"dali": run.train_loader,
               "synthetic": SyntheticLoader(run.train_loader, num_classes=len(run.classes), seed=run.args.seed)}
    for name, changes in chosen.values():
        if name in loaders:
            continue
        problems = []
        loaders[name], _ = create_loaders(dataclasses.replace(run.args, **changes), data=run.data, spec=run.spec,
                                          ds_config=run.ds_config, precision=run.precision, device=run.device,
                                          eval_samples=0, state=None, problems=problems)
        if problems:
            raise SystemExit(f"benchmark_levers: {name}: {'; '.join(problems)}")
    return loaders


def segment(run, batches, *, warm: int, steps: int) -> tuple[float, float]:
    """(seconds, seconds waiting for data) of `steps` steps of the trainer's loop after `warm` ones."""
    bar = tqdm(disable=True)
    for _ in range(warm):
        advance(run, batches, new_meter(), bar)
    get_accelerator().synchronize()
    meter, start = new_meter(), time.perf_counter()
    for _ in range(steps):
        advance(run, batches, meter, bar)
    get_accelerator().synchronize()
    return time.perf_counter() - start, meter["wait"]


def measure(run, *, steps: int, rounds: int) -> dict:
    chosen = variants(run)
    loaders = build_loaders(run, chosen)
    accum = run.ds_config["gradient_accumulation_steps"]
    batches = {name: step_batches(loader, accum=accum) for name, loader in loaders.items()}
    images = steps * run.ds_config["train_batch_size"]
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    streams = {name: compute_stream(run.device, high_priority=changes.get("priority_stream", False))
               for name, (_, changes) in chosen.items()}
    averages = {name: WeightAverage(run.engine.module, decay=changes["ema_decay"], device=run.device)
                for name, (_, changes) in chosen.items() if "ema_decay" in changes}
    names, base, average = list(chosen), run.args, run.ema
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            loader, changes = chosen[name]
            # the loaders and streams carry the other changes; the loop reads only --nan_guard from the args
            run.args = dataclasses.replace(base, **{k: v for k, v in changes.items() if k == "nan_guard"})
            run.ema = averages.get(name, average)
            with torch.cuda.stream(streams[name]):
                timings[name].append(segment(run, batches[loader], warm=PREFETCH + 1, steps=steps))
            if run.rank == 0:
                print(f"benchmark_levers: round {r + 1}/{rounds}, {name}: {images / timings[name][-1][0]:.1f} img/s",
                      flush=True)
    run.args, run.ema = base, average
    results = {}
    for name, runs in timings.items():
        guard = chosen[name][1].get("nan_guard", "skip")
        results[name] = {"images_per_sec": statistics.median(images / seconds for seconds, _ in runs),
                         "runs": [round(images / seconds, 2) for seconds, _ in runs],
                         "data_wait_fraction": statistics.median(wait / seconds for seconds, wait in runs),
                         "ceiling": "synthetic" if guard == "skip" else "synthetic, nan_guard stop"}
    for row in results.values():
        row["share_of_ceiling"] = row["images_per_sec"] / results[row["ceiling"]]["images_per_sec"]
    return results


def table(results: dict) -> str:
    lines = ["| variant | img/s (median) | share of its ceiling | data wait | img/s per round |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['images_per_sec']:.1f} | {row['share_of_ceiling']:.1%} "
                     f"({row['ceiling']}) | {row['data_wait_fraction']:.1%} | "
                     f"{', '.join(f'{v:.0f}' for v in row['runs'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other arguments go to "
                                     "train/main.py's parser (--data, --model_config, --micro_batch_size, ...).")
    parser.add_argument("--steps", type=int, default=15, help="timed optimizer steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ours, rest = parser.parse_known_args(argv)
    # no --overwrite_output_dir: an --output_dir holding a run's checkpoints is refused, never cleared
    # (this tool saves none, so its own folder never holds any)
    args = parse_args(["--wandb_mode", "disabled", "--output_dir", str(Path(tempfile.gettempdir()) / "benchmark_levers"),
                       "--skip_shard_hashes", *rest,
                       # never the run's last step (no final eval or save), at a constant rate from the start
                       "--max_steps", str(10**9), "--eval_steps", str(10**9), "--lr_scheduler", "constant",
                       "--warmup_steps", "0"])
    with distributed():
        try:
            run = setup(args)
        except ConfigError as e:
            if dist.get_rank() == 0:
                print(f"benchmark_levers: configuration error:\n{e}", file=sys.stderr)
            return 2
        run.engine.train()
        results = measure(run, steps=ours.steps, rounds=ours.rounds)
        run.logger.finish()
        if run.rank == 0:
            model = args.model or Path(args.model_config).stem
            print(f"\n{model}, micro batch {run.ds_config['train_micro_batch_size_per_gpu']}, {run.precision}, "
                  f"{run.world_size} rank(s) on {run.device.type}, {ours.steps} steps x {ours.rounds} rounds\n")
            print(table(results))
            if ours.json:
                ours.json.write_text(json.dumps({"model": model, "device": run.device.type, "precision": run.precision,
                                                 "micro": run.ds_config["train_micro_batch_size_per_gpu"],
                                                 "steps": ours.steps, "rounds": ours.rounds, "results": results},
                                                indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
