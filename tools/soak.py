"""Randomized training runs at the sizes users have, each checked for what must hold.

    python tools/soak.py [--trials N] [--seed S] [--out DIR] [--precision fp32|bf16] [--preempt] [--compile]
                         [--json FILE]

Each trial trains a tiny ResNet or ViT on scikit-learn's digits (1,618 train / 179 val images: they
divide by no number of ranks) with random ranks (1-4 CPU processes, an even number of them as one
node or as two nodes of this machine; on a GPU machine, up to one per GPU), micro batch,
accumulation, ZeRO stage (3 with or without CPU offload), the launcher (DeepSpeed's, or none: srun's
tasks, started as SLURM's step daemon starts them), `--epochs`, augmentation (random erasing
included), the eval cadence (every epoch or `--eval_steps`), `--gradient_checkpointing` (ViT), the
checkpoint cadence
(every eval or `--save_steps`), `--save_total_limit`, `--export`, and the rest of the recipe (label
smoothing, schedule, warmup, clipping, the eval resize, channels-last; with `--compile`, every
launch compiled), in one to three launches: each but the last stops at a random `--max_steps`, and
the next goes on with `--resume auto` on other ranks, nodes, micro batch or accumulation, some with
a new `--lr` or augmentation (as a user changes them after a loss spike), more `--epochs`, or the
ZeRO config that reads the same checkpoint (ZeRO-1 <-> 2, ZeRO-3 with CPU offload on or off) (with
`--preempt`, some launches are instead stopped by SIGTERM to every process of the job once a random
step is logged, as a scheduler preempts a job: the stop then falls where the ranks agree, so such
trials do not repeat exactly). Some launches get NaN pixels on one rank (TRAIN_NAN_AT) for a whole
step or one micro batch of it: with `--nan_guard skip` the step is skipped or trains on its other
micro batches; with `--nan_guard stop` the launch stops there instead of at its `--max_steps` (exit
4, as after a crash) and the next goes on from the newest checkpoint. Some launches instead fail
there: an unexpected error on one rank (TRAIN_FAIL_AT, as a bug or a device fault), exit 1, that
rank's traceback and every other rank's "stopping" line saying why, one traceback in all; or, half
of them, the rank killed outright (SIGKILL, as the OOM killer does): every other rank says why it
stops, those of its node naming it and how it died (half of those with every other rank waiting in
that step without an error, as collectives wait for a dead peer under NCCL: the ranks of its node
find it, or rank 0 once it has not heard from it for `--peer_timeout`, 10 s in every launch). Some
resumed launches branch: they go on from an older checkpoint than the newest (`--resume
OUT/checkpoints/step-N`, as a user goes back before a loss spike), and the line past it is set
aside. Then it checks the run's metrics and sample keys (the line the last launch continued):

- every step from 1 to the planned last was trained once and logged once;
- no sample was read twice within an epoch (all ranks and launches together), and every whole
  epoch read all but fewer than a batch per rank and launch;
- every eval counted each val sample once, and the evals fell where epochs end (or at the
  multiples of `--eval_steps`), at the run's last step, and at no other step but where a launch
  stopped;
- train/epoch ends at --epochs, within a step (or where a --max_steps past it stopped);
- the checkpoints left are the newest `--save_total_limit` of those saved (at the save cadence,
  at each launch's stop and at the last step; after a branch, those the branch found and those
  saved past it) and the best by eval top-1 among them, all complete;
- the export is the checkpoint of the best eval among them (the newest among equals), across
  launches, or with `--export last` the last step's, and eval_results.json is the last step's eval
  of every val sample;
- `--eval_only` of the export, on 1-4 ranks and another eval batch size, counts every val sample
  once and finds the top-1 that the run's eval of that step found (with `--ema_decay`, drawn for a
  third of the trials, of the weight average: every eval also logs the trained weights', and every
  checkpoint holds the average);
- every logged value is finite; the steps logged without a train/loss are the NaN-skipped ones, and
  train/skipped_steps counts them; a NaN stop or a failure left no checkpoint at or after its step
  and named the one to go on from.

Prints one line per trial and exits 1 if any trial broke a rule (the JSON report says which).
Found with it: ZeRO-3's uninitialized partition padding refused a bf16 ViT's first checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from make_shards import make_shards
from train.checkpoint import EMA_FILE, checkpoint_info, complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PEER_TIMEOUT_S = 10  # the least --peer_timeout: no rank of a soak's loaded machine may seem silent that long
TRAIN, VAL = 1618, 179  # digits, as make_shards splits them
MODELS = {
    "resnet": {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1],
               "layer_type": "basic", "downsample_in_first_stage": False},
    "vit": {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0},
}
AUGMENTS = ([], ["--hflip", "0.5", "--color_jitter", "0.3"], ["--auto_augment", "rand_augment"],
            ["--mixup_alpha", "0.2", "--cutmix_alpha", "1.0"])
# what a resumed launch may change (a user lowering the lr after a spike, or changing the augmentation)
CHANGES = (["--lr", "3e-4"], ["--color_jitter", "0.2"], ["--auto_augment", "trivial_augment"])


def prepare(out: Path) -> None:
    """The digits shards, the model configs and a 32x32 processor, made once under `out`."""
    from transformers import ViTImageProcessorPil

    if not (out / "digits" / "manifest.json").is_file():
        make_shards(src="sklearn:digits", out=out / "digits", max_count=100, progress=False)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out / "processor")
    for name, config in MODELS.items():
        (out / f"{name}.json").write_text(json.dumps(config))


def draw(rng: random.Random, *, precision: str, max_ranks: int = 4, split: bool = True, preempt: bool = False,
         compile: bool = False) -> dict:
    """A trial's settings: the run's own, and (ranks, micro batch, accumulation) per launch."""
    launches = [(rng.choice(range(1, max_ranks + 1)), rng.choice([8, 13, 24, 40]), rng.choice([1, 1, 2, 3]))
                for _ in range(rng.choice([1, 2, 3]))]
    settings = {"model": rng.choice(sorted(MODELS)), "zero": rng.choice(["zero1", "zero2", "zero3"]),
                "epochs": rng.choice([1.5, 2.0, 2.5, 3.0]), "augment": rng.choice(AUGMENTS),
                "nan_guard": rng.choice(["skip", "stop"]), "precision": precision, "launches": launches}
    settings["nodes"] = [rng.choice([1, 2]) if split and ranks % 2 == 0 else 1 for ranks, _, _ in launches]
    settings["preempt"] = [preempt and rng.choice([False, True]) for _ in launches[:-1]]
    every, offload, checkpointing = rng.randint(5, 40), rng.random() < 0.5, rng.random() < 0.3
    settings["eval_steps"] = every if rng.random() < 0.3 else None  # else every epoch
    settings["zero"] += "_offload" if settings["zero"] == "zero3" and offload else ""
    settings["gradient_checkpointing"] = checkpointing and settings["model"] == "vit"
    # the draws below come from their own stream (seeded by the draws above), so that a seed draws
    # the same trials as before they were added
    own = random.Random(json.dumps(settings, sort_keys=True))
    settings["save_steps"] = own.randint(4, 30) if own.random() < 0.4 else None  # else at every eval
    settings["keep"], settings["export"] = own.choice([1, 2, 3]), own.choice(["best", "best", "last"])
    settings["recipe"] = (["--label_smoothing", "0.1"] * (own.random() < 0.3)
                          + ["--lr_scheduler", own.choice(["cosine", "linear", "constant"])]
                          + ["--warmup_steps", str(own.randint(0, 20))] * (own.random() < 0.3)
                          + ["--max_grad_norm", "0"] * (own.random() < 0.2)
                          + ["--eval_resize", own.choice(["dali", "torch", "pillow"])]
                          + ["--channels_last"] * (settings["model"] == "resnet" and own.random() < 0.3))
    settings["changes"] = [[]] + [own.choice(CHANGES) if own.random() < 0.35 else [] for _ in launches[1:]]
    more = random.Random(json.dumps(settings, sort_keys=True))  # added later still: more epochs (a user
    for change in settings["changes"][1:]:  # extending a run), where a launch changes nothing else
        change += ["--epochs", str(settings["epochs"] + 0.5)] if not change and more.random() < 0.3 else []
    faults = random.Random(json.dumps(settings, sort_keys=True))  # later still: non-finite losses
    settings["nan"] = [nan_fault(faults, ranks=ranks, accum=accum, guard=settings["nan_guard"], last=n == len(launches) - 1)
                       for n, (ranks, _, accum) in enumerate(launches)]
    branches = random.Random(json.dumps(settings, sort_keys=True))  # and branches: where a resumed launch
    settings["branch"] = [None] + [branches.random() if branches.random() < 0.25 else None  # goes back to
                                   for _ in launches[1:]]  # (a fraction of the older checkpoints)
    last = random.Random(json.dumps(settings, sort_keys=True))  # and --eval_only of the export at the end
    settings["eval_only"] = [last.randint(1, max_ranks), last.choice([None, 7, 16])]  # ranks, --eval_batch_size
    switch = random.Random(json.dumps(settings, sort_keys=True))  # and a resumed launch (and those after it)
    settings["zero_switch"] = [False] + [switch.random() < 0.2 for _ in launches[1:]]  # on the config that
    # shares the checkpoint format: ZeRO-1 <-> 2, ZeRO-3 <-> 3 with CPU offload; and an unexpected
    fail = random.Random(json.dumps(settings, sort_keys=True))  # error on one rank where a launch stops
    settings["fail"] = [fail.randrange(ranks) if fail.random() < 0.15 and n < len(launches) - 1 else None
                        for n, (ranks, _, _) in enumerate(launches)]
    kill = random.Random(json.dumps(settings, sort_keys=True))  # and half of those: the rank killed outright
    settings["kill"] = [rank is not None and kill.random() < 0.5 for rank in settings["fail"]]  # (SIGKILL)
    hang = random.Random(json.dumps(settings, sort_keys=True))  # and half of those: the other ranks wait in
    settings["hang"] = [killed and hang.random() < 0.5 for killed in settings["kill"]]  # their step (NCCL)
    settings["compile"] = compile  # the same trials compiled
    layers = random.Random(json.dumps(settings, sort_keys=True))  # and layer-wise lr decay (by the ViT's layers,
    settings["layer_decay"] = layers.choice([None, None, 0.65, 0.8])  # the ResNet's blocks)
    sizes = random.Random(json.dumps(settings, sort_keys=True))  # and a ViT at another image size than its
    settings["image_size"] = sizes.choice([None, None, 40]) if settings["model"] == "vit" else None  # config's
    averages = random.Random(json.dumps(settings, sort_keys=True))  # and a weight average (EMA)
    settings["ema_decay"] = averages.choice([None, None, 0.9])
    erasing = random.Random(json.dumps(settings, sort_keys=True))  # and random erasing
    settings["random_erase"] = erasing.choice([None, None, 0.25])
    started = random.Random(json.dumps(settings, sort_keys=True))  # and launches of several ranks started by srun
    settings["srun"] = [ranks > 1 and started.random() < 0.3 for ranks, _, _ in settings["launches"]]  # (no launcher)
    logged = random.Random(json.dumps(settings, sort_keys=True))  # and W&B offline, as by default (a scheduler's
    settings["wandb"] = logged.choice(["disabled", "disabled", "offline"])  # SIGTERM ends its process too)
    return settings


SIBLING = {"zero1": "zero2", "zero2": "zero1", "zero3": "zero3_offload", "zero3_offload": "zero3"}


def zero_configs(settings: dict) -> list[str]:
    """The ZeRO config of each launch: the trial's, switched to its sibling (SIBLING) where drawn."""
    configs, zero = [], settings["zero"]
    for switch in settings.get("zero_switch", [False] * len(settings["launches"])):
        zero = SIBLING[zero] if switch else zero
        configs.append(zero)
    return configs


def nan_fault(rng: random.Random, *, ranks: int, accum: int, guard: str, last: bool) -> dict | None:
    """A launch's injected non-finite loss (TRAIN_NAN_AT), or None: NaN pixels on one rank for a
    whole step or one micro batch of it, at a fraction `at` of the launch's steps. With --nan_guard
    skip the step is skipped (a whole step) or trains on the other micro batches; with stop the
    launch ends there (exit 4, nothing saved) and the next goes on from the newest checkpoint, so
    only a launch that has a next one crashes."""
    if rng.random() >= 0.3 or (guard == "stop" and last):
        return None
    return {"rank": rng.randrange(ranks), "micro": rng.randint(1, accum) if rng.random() < 0.5 else None,
            "at": rng.random()}


def nan_spec(fault: dict, step: int) -> str:
    """TRAIN_NAN_AT for `fault` at `step`: "RANK:STEP" (every micro batch) or "RANK:STEP.MICRO"."""
    return f"{fault['rank']}:{step}" + (f".{fault['micro']}" if fault["micro"] else "")


def skips_step(fault: dict, accum: int) -> bool:
    """Whether `fault` leaves no finite micro batch in its step (--nan_guard skip skips it)."""
    return fault["micro"] is None or accum == 1


def final_epochs(settings: dict) -> float:
    """The --epochs of the trial's last launch (a resumed launch may train more)."""
    change = settings.get("changes", [[]])[len(settings["launches"]) - 1]
    return float(change[change.index("--epochs") + 1]) if "--epochs" in change else settings["epochs"]


def flags(settings: dict) -> list[str]:
    """The trainer flags a trial draws besides the model, ZeRO config, epochs and batch sizes."""
    return (settings["augment"] + ["--gradient_checkpointing"] * settings["gradient_checkpointing"]
            + ["--compile"] * settings.get("compile", False)
            + (["--layer_decay", str(settings["layer_decay"])] if settings.get("layer_decay") else [])
            + (["--image_size", str(settings["image_size"])] if settings.get("image_size") else [])
            + (["--ema_decay", str(settings["ema_decay"])] if settings.get("ema_decay") else [])
            + (["--random_erase", str(settings["random_erase"])] if settings.get("random_erase") else [])
            + (["--eval_steps", str(settings["eval_steps"])] if settings["eval_steps"] else [])
            + (["--save_steps", str(settings["save_steps"])] if settings.get("save_steps") else [])
            + (["--save_total_limit", str(settings["keep"])] if settings.get("keep", 2) != 2 else [])
            + (["--export", "last"] if settings.get("export") == "last" else []) + settings.get("recipe", []))


def trial(trial_dir: Path, settings: dict, *, data: Path, rng: random.Random) -> dict:
    """Runs the trial's launches in `trial_dir`; returns the settings with the stops, the planned
    steps, the steps a NaN skipped or crashed, and the rules broken ("problems"), or with "failed"
    (a launch's exit and output tail)."""
    shutil.rmtree(trial_dir, ignore_errors=True)
    common = ["--data", str(data / "digits"), "--model_config", str(data / f"{settings['model']}.json"),
              "--processor", str(data / "processor"), "--output_dir", str(trial_dir),
              "--precision", settings["precision"],
              "--epochs", str(settings["epochs"]), "--nan_guard", settings["nan_guard"], "--record_keys",
              "--log_steps", "1", "--peer_timeout", str(PEER_TIMEOUT_S), *flags(settings)]
    result, stops, planned, start, nans, branches = dict(settings), [], 0, 0, [], []
    last = len(settings["launches"]) - 1
    faults = settings.get("nan", [None] * (last + 1))
    nan_stops = [fault is not None and settings["nan_guard"] == "stop" for fault in faults]
    fails = [None if nan_stop else fail for nan_stop, fail in zip(nan_stops, settings.get("fail", [None] * (last + 1)))]
    faults = [fault if fail is None else None for fault, fail in zip(faults, fails)]  # one fault a launch
    crashes = [nan_stop or fail is not None for nan_stop, fail in zip(nan_stops, fails)]
    result["preempt"] = [p and not crash for p, crash in zip(settings["preempt"], crashes)]  # a crash stops it first
    for n, ((ranks, micro, accum), nodes) in enumerate(zip(settings["launches"], settings["nodes"])):
        args = [*common, "--micro_batch_size", str(micro), "--grad_accum", str(accum), *settings["changes"][n],
                "--ds_config", f"ds_configs/{zero_configs(settings)[n]}.json"]
        complete = complete_checkpoints(trial_dir / "checkpoints")[0]
        if n and (pick := settings.get("branch", [None] * (last + 1))[n]) is not None and len(complete) > 1:
            back = complete[int(pick * (len(complete) - 1))]  # an older checkpoint than the newest: a branch
            start = checkpoint_info(back)["step"]
            stops = [s for s in stops if s < start] + [start]  # the line goes on from there (a stop of
            # the line: a --max_steps stop past --epochs may have trained it); past it, set aside with its NaNs
            nans = [nan for nan in nans if nan["step"] <= start or nan.get("crash")]
            found = [checkpoint_info(p)["step"] for p in complete]
            branches.append({"launch": n + 1, "from": start, "present": [s for s in found if s <= start]})
            args += ["--resume", str(back)]
        else:
            args += ["--resume", "auto"] if n else []
        fault, crash = faults[n], crashes[n]
        per_epoch = max(1, TRAIN // ranks // micro // accum)
        preempt_at = stop = None
        if n < last:  # stop within the next epoch and a half of this launch
            stop = start + rng.randint(1, max(1, per_epoch * 3 // 2))
            if result["preempt"][n]:
                preempt_at = stop
            elif not crash:  # (a crash stops it at a NaN there instead)
                stops.append(stop)
                args += ["--max_steps", str(stop)]
        killed = fails[n] is not None and settings.get("kill", [False] * (last + 1))[n]
        env = {"TRAIN_FAIL_AT": f"{fails[n]}:{stop}" + (":kill" if killed else "")} if fails[n] is not None else {}
        if killed and hangs(settings, n):  # no collective fails: only the killed rank's node can find it
            env["TRAIN_FAIL_AT"] += "".join(f",{k}:{stop}:hang" for k in range(ranks) if k != fails[n])
        if fault is not None:  # at `stop` for a crash, else at a fraction of the launch's steps
            nan_at = stop if nan_stops[n] else start + 1 + int(fault["at"] * ((stop or start + per_epoch * 3 // 2) - start))
            env["TRAIN_NAN_AT"] = nan_spec(fault, nan_at)
        srun = settings.get("srun", [False] * (last + 1))[n]
        env["WANDB_MODE"] = settings.get("wandb", "disabled")
        code, output = launch(args, ranks=ranks, nodes=nodes, logs=trial_dir.parent / f"{trial_dir.name}.launch{n + 1}",
                              preempt_at=preempt_at, metrics=trial_dir / "metrics.jsonl", env=env, srun=srun)
        planned = int(found.group(1)) if (found := re.search(r"train: (\d+) steps", output)) else planned
        ended = "\ntrain: done, " in output  # (exit -15 when its runner caught a SIGTERM on the way out)
        if crash and not ended:  # at `stop`, a failure or a NaN stop
            if killed:
                problem = kill_problem(code, output, rank=fails[n], step=stop, ranks=ranks, nodes=nodes, srun=srun)
            elif fails[n] is not None:
                problem = fail_problem(code, output, rank=fails[n], step=stop, ranks=ranks)
            elif code == 4 and re.search(rf"not finite on some rank (at step|between steps \d+ and) {stop}\b", output):
                problem = None
            else:
                problem = f"a NaN loss at step {stop} with --nan_guard stop should stop it there (exit 4); exit {code}"
            if problem:
                return {**result, "stops": stops, "failed": f"launch {n + 1}: {problem}: {output[-3000:]}"}
            complete = complete_checkpoints(trial_dir / "checkpoints")[0]
            start = checkpoint_info(complete[-1])["step"] if complete else 0  # where --resume auto goes on
            told = f"the newest complete checkpoint, {complete[-1]}, is intact" if complete else "no checkpoint was saved"
            # (none can tell when the only rank, or rank 0 alone on its node, was killed: the store went with it)
            told = told in output or (killed and (ranks == 1 or fails[n] == 0 and ranks // nodes == 1))
            nans.append({"step": stop, "launch": n + 1, "crash": True, "resumed": start, "told": told,
                         **({"fail": fails[n]} if fails[n] is not None else {}), **({"killed": True} if killed else {}),
                         **({"hang": True} if killed and hangs(settings, n) else {})})
            continue
        if fault is not None and nan_at <= last_step(trial_dir / "metrics.jsonl"):  # the launch reached it
            nans.append({"step": nan_at, "launch": n + 1, "skipped": skips_step(fault, accum)})
        if preempt_at is not None and (stopped := re.search(r"every rank stopped after step (\d+); saved", output)):
            stops.append(int(stopped.group(1)))
        elif (preempt_at is not None or crash) and ended:  # the run ended before the signal or the NaN came (its
            result["launches"] = settings["launches"][:n + 1]  # runner may have caught it on the way out): the
            result["preempt"] = result["preempt"][:n]  # launches after it have nothing to train
            break
        elif code != 0:
            return {**result, "stops": stops, "failed": f"launch {n + 1}: exit {code}: {output[-3000:]}"}
        start = stops[-1] if n < last else start
    result["nans"], result["branches"] = nans, branches
    problems = check(trial_dir, result, stops, planned, output=output)
    if (exported := re.search(r"\(from step-(\d+), ", output)) and settings.get("eval_only"):
        problems += eval_only_problems(trial_dir, settings, step=int(exported.group(1)), data=data)
    return {**result, "stops": stops, "steps": planned, "problems": problems}


def hangs(settings: dict, n: int) -> bool:
    """Whether the other ranks of launch `n`, whose rank `settings["fail"][n]` is killed, wait in its
    step without an error (TRAIN_FAIL_AT=R:S:hang), as collectives wait for a dead peer under NCCL:
    the ranks of its node find it, or, where it was alone on its node, rank 0 once it has not heard
    from it for PEER_TIMEOUT_S."""
    return settings.get("hang", [False] * (n + 1))[n] and settings["launches"][n][0] > 1


def fail_problem(code: int, output: str, *, rank: int, step: int, ranks: int) -> str | None:
    """What a launch that an unexpected error on `rank` in `step` ended (TRAIN_FAIL_AT) got wrong:
    it exits 1; that rank says it failed there, its traceback the only one; every other rank stops
    saying why."""
    expected = [f"train: rank {rank}: failed at step {step} (the traceback follows)"] + [
        f"train: rank {k}: stopping: rank {rank} failed at step {step}: RuntimeError" for k in range(ranks) if k != rank]
    missing, tracebacks = [line for line in expected if line not in output], output.count("Traceback (most recent call")
    noise = [text for text in ("terminate called", "failed on SocketImpl") if text in output]  # an abort, a store gone
    if code != 1 or missing or tracebacks != 1 or noise:
        return (f"rank {rank} failing at step {step}: exit {code} (expected 1), {tracebacks} tracebacks (expected 1)"
                + (f", missing {missing}" if missing else "") + (f", {noise}" if noise else ""))
    return None


def kill_problem(code: int, output: str, *, rank: int, step: int, ranks: int, nodes: int,
                 srun: bool = False) -> str | None:
    """What a launch whose `rank` was killed outright in `step` (TRAIN_FAIL_AT=R:S:kill, as the OOM
    killer does) got wrong: it fails (the killed rank's -9 alone, or through a launcher 247 or a
    survivor's 1; under srun the highest task status, 137 or 1); every other rank says why it
    stops, each on the killed rank's node naming it and how it died; a traceback only from the
    first to notice on another node (its collective's), which names the rank that did not answer
    its post."""
    if ranks == 1:
        return None if code == -signal.SIGKILL else f"the only rank killed at step {step}: exit {code} (expected -9)"
    node = ranks // nodes
    said = {k: re.findall(rf"train: rank {k}: (stopping: .*|failed at step {step} \(the traceback follows\).*)",
                          output) for k in range(ranks) if k != rank}
    silent = [k for k, lines in said.items() if not lines]
    failed = [k for k, lines in said.items() if any(line.startswith("failed") for line in lines)]
    unnamed = [k for k, lines in said.items() if not any(  # its node's ranks find it; the first elsewhere, its silence
        f"rank {rank}'s process (pid " in line or line.startswith("failed") and f"rank {rank} did not answer" in line
        for line in lines) and (k // node == rank // node or k in failed)]
    tracebacks = output.count("Traceback (most recent call")
    expected = (128 + signal.SIGKILL, 1) if srun else (256 - signal.SIGKILL, 1)
    if (code not in expected or silent or unnamed or tracebacks != len(failed)
            or any(k // node == rank // node for k in failed) or len(failed) > 1 or "terminate called" in output):
        return (f"rank {rank} killed at step {step}: exit {code} (expected {' or '.join(map(str, expected))}), "
                f"silent ranks {silent}, ranks not naming it {unnamed}, failed {failed} with {tracebacks} tracebacks")
    return None


def eval_only_problems(out: Path, settings: dict, *, step: int, data: Path) -> list[str]:
    """--eval_only of the run's export (from checkpoint `step`) on the trial's eval ranks and batch
    size: it must count every val sample once and find the top-1 the run's eval at `step` found
    (the same weights, BatchNorm statistics and pixels, whatever the ranks or the batch), exactly,
    except under ZeRO-3 in bf16 (see export_eval_problems)."""
    ranks, batch = settings["eval_only"]
    recipe = settings.get("recipe", [])
    args = ["--eval_only", "--model", str(out / "model"), "--data", str(data / "digits"), "--output_dir",
            str(out / "eval_only"), "--precision", settings["precision"]] + ["--channels_last"] * ("--channels_last" in recipe)
    args += ["--eval_resize", recipe[recipe.index("--eval_resize") + 1]] if "--eval_resize" in recipe else []
    args += ["--eval_batch_size", str(batch)] if batch else []
    code, output = launch(args, ranks=ranks, nodes=1, logs=out.parent / f"{out.name}.eval_only")
    if code != 0:
        return [f"--eval_only of the export on {ranks} rank(s): exit {code}: {output[-1500:]}"]
    near_ties = 2 if settings["precision"] == "bf16" and settings["zero"].startswith("zero3") else 0
    return export_eval_problems(out, step=step, ranks=ranks, near_ties=near_ties)


def export_eval_problems(out: Path, *, step: int, ranks: int, near_ties: int = 0) -> list[str]:
    """eval_only_problems' rules, on the files its --eval_only wrote in OUT/eval_only. `near_ties`:
    how many predictions may differ from the run's eval. A ZeRO-3 engine computes a linear layer as
    DeepSpeed's zero3_linear_wrap does (on 3-D inputs: the matmul rounded to the precision, then
    the bias added), --eval_only as torch does (fused): in bf16 the probabilities differ by up to
    ~1e-3 and a near-tie can flip (seen: 1 of 179; --eval_only with zero3_linear_wrap patched in
    reproduced the run's eval exactly)."""
    results = json.loads((out / "eval_only" / "eval_results.json").read_text())
    keys = [json.loads(line)["key"] for line in (out / "eval_only" / "predictions.jsonl").read_text().splitlines()]
    trained = {r["step"]: r["eval/top1"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "eval/top1" in r}
    problems = []
    if (results["samples"], len(keys), len(set(keys))) != (VAL, VAL, VAL):
        problems.append(f"--eval_only on {ranks} rank(s): {results['samples']} samples, {len(keys)} predictions, "
                        f"{len(set(keys))} keys, of {VAL}")
    if step in trained and abs(results["top1"] - trained[step]) * VAL > near_ties + 1e-6:
        problems.append(f"--eval_only of the export (step {step}) on {ranks} rank(s): top-1 {results['top1']:.4f}, "
                        f"the run's eval at step {step}: {trained[step]:.4f}")
    return problems


def launch(args: list[str], *, ranks: int, nodes: int, logs: Path, preempt_at: int | None = None,
           metrics: Path | None = None, env: dict | None = None, srun: bool = False) -> tuple[int, str]:
    """The trainer on `ranks` ranks: one process, one launcher, or `nodes` launchers as nodes of
    this machine (a hostfile, `--no_ssh --node_rank K`) sharing the output dir; with `srun`, no
    launcher: on each node what SLURM's step daemon does (tests/srun_step.py). With `preempt_at`,
    SIGTERM to every process of the job, as a scheduler preempts it, once `metrics` logs that step.
    `env` adds to the environment. Returns the worst exit code and the output (node 0's first), kept
    in `logs`.node{K}.log."""
    main, env, port = str(ROOT / "train" / "main.py"), {**os.environ, "WANDB_MODE": "disabled", **(env or {})}, str(free_port())
    if ranks == 1:
        commands = [[sys.executable, main]]
    elif srun:
        env["MASTER_PORT"] = port
        commands = [[sys.executable, str(ROOT / "tests" / "srun_step.py"), port, str(k), ",".join([str(ranks // nodes)]
                     * nodes), "localhost", "--", sys.executable, main] for k in range(nodes)]
    elif nodes == 1:
        commands = [["deepspeed", "--num_gpus", str(ranks), "--master_port", port, main]]
    else:
        hostfile = logs.with_suffix(".hosts")
        hostfile.write_text("".join(f"{host} slots={ranks // nodes}\n" for host in ("localhost", "127.0.0.1")[:nodes]))
        commands = [["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k), "--master_addr",
                     "127.0.0.1", "--master_port", port, main] for k in range(nodes)]
    files = [logs.with_name(f"{logs.name}.node{k}.log") for k in range(len(commands))]
    jobs = []
    for command, path in zip(commands, files):
        with open(path, "w") as log:
            jobs.append(subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True))
    deadline, started = time.monotonic() + 1800, False
    # the rows of this launch: once its banner is out, the rows an earlier one left past its checkpoint are cut
    while preempt_at is not None and any(job.poll() is None for job in jobs) and time.monotonic() < deadline:
        started = started or bool(re.search(r"train: \d+ steps", files[0].read_text()))
        if started and last_step(metrics) >= preempt_at:
            break
        time.sleep(0.1)
    for job in jobs:
        if preempt_at is not None and alive(job.pid):
            os.killpg(job.pid, signal.SIGTERM)
    for job in jobs:  # and its ranks: a deepspeed runner dies on SIGTERM while its ranks save
        while (job.poll() is None or alive(job.pid)) and time.monotonic() < deadline:  # poll() reaps the runner
            time.sleep(0.1)
        if alive(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    return max(job.returncode for job in jobs), "\n".join(path.read_text() for path in files)


def alive(group: int) -> bool:
    """Whether a process of the process group `group` (a launcher's session) runs, or is a zombie."""
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def last_step(metrics: Path) -> int:
    """The last step `metrics` (metrics.jsonl) logged, 0 before the first."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return json.loads(line)["step"]
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(out: Path, settings: dict, stops: list[int], planned: int, *, output: str | None = None) -> list[str]:
    """The rules of the module docstring the run in `out` broke (those about the export given the
    last launch's `output`)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_at = {r["step"]: r["train/epoch"] for r in rows if "train/epoch" in r}
    steps = sorted(epoch_at)
    problems = []
    if steps != list(range(1, planned + 1)):
        problems.append(f"steps logged: {len(steps)} ({steps[:2]}..{steps[-2:]}), planned 1..{planned}")
    if not steps:
        return problems
    epoch_of = {s: math.ceil(epoch_at[s] - 1e-9) - 1 for s in steps}  # train/epoch in (e, e + 1]: epoch e
    ends = [s for s in steps if epoch_of.get(s + 1) != epoch_of[s]]
    evals = [r for r in rows if "eval/top1" in r]
    problems += [f"eval at step {r['step']} counted {r['eval/samples_counted']:.0f} of {VAL}" for r in evals
                 if r["eval/samples_counted"] != VAL]
    at, every = [r["step"] for r in evals], settings.get("eval_steps")
    due = [s for s in steps if s % every == 0 or s == steps[-1]] if every else ends
    if [s for s in due if s not in at] or [s for s in at if s not in due and s not in stops]:
        problems.append(f"evals at steps {at}, due at {due}" if every else f"evals at steps {at}, epochs end at {ends}")
    problems += checkpoint_problems(out, settings, steps=steps, stops=stops, evals=evals, due=due, output=output)
    if settings.get("ema_decay"):
        problems += [f"the eval at step {r['step']} has no eval_no_ema/top1" for r in evals if "eval_no_ema/top1" not in r]
        problems += [f"{p.name} holds no weight average" for p in complete_checkpoints(out / "checkpoints")[0]
                     if not (p / EMA_FILE).is_file()]
    problems += nan_problems(rows, settings.get("nans", []))
    final = json.loads((out / "eval_results.json").read_text()) if (out / "eval_results.json").is_file() else {}
    if evals and (final.get("step"), final.get("samples")) != (steps[-1], VAL):
        problems.append(f"eval_results.json: step {final.get('step')}, {final.get('samples')} samples; the run "
                        f"ended at step {steps[-1]}")
    epochs = final_epochs(settings)
    reached = max([epochs] + [epoch_at[s] for s in stops if s in epoch_at])
    ranks, micro, accum = settings["launches"][-1]
    step = 1 / max(1, TRAIN // ranks // micro // accum)  # of an epoch: the steps to --epochs are rounded up
    if not epochs - step - 1e-6 <= epoch_at[steps[-1]] <= reached + step + 1e-6:
        problems.append(f"train/epoch at the end {epoch_at[steps[-1]]:.4f}, --epochs {epochs}")
    keys: dict[int, list[str]] = {}
    for log in (out / "sample_keys").glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            keys.setdefault(record["step"], []).extend(record["keys"])
    read: dict[int, list[str]] = {}
    for s in steps:
        read.setdefault(epoch_of[s], []).extend(keys.get(s, []))
    dropped = sum(r * (m * a + 1) for r, m, a in settings["launches"])  # at most, per epoch
    for epoch, samples in sorted(read.items()):
        if len(samples) != len(set(samples)):
            problems.append(f"epoch {epoch + 1}: {len(samples) - len(set(samples))} samples read twice")
        if epoch + 1 <= epochs and len(set(samples)) < TRAIN - dropped:
            problems.append(f"epoch {epoch + 1}: {len(set(samples))} of {TRAIN} samples read")
    return problems


def nan_problems(rows: list[dict], nans: list[dict]) -> list[str]:
    """The rules about injected NaN losses the metrics `rows` broke: every logged value is finite;
    the steps logged without a train/loss are those --nan_guard skip skipped (a NaN in each of
    their micro batches), and train/skipped_steps counts them; a launch that a NaN stopped
    (--nan_guard stop) had saved no checkpoint at or after it, and named the one to go on from."""
    problems = [f"{key} = {value} at step {row['step']}" for row in rows for key, value in row.items()
                if not math.isfinite(value)]
    train = [row for row in rows if "train/epoch" in row]
    lossless = [row["step"] for row in train if "train/loss" not in row]
    skipped = sorted(nan["step"] for nan in nans if nan.get("skipped"))
    if lossless != skipped:
        problems.append(f"steps logged without a train/loss {lossless}, NaN-skipped steps {skipped}")
    if train and train[-1].get("train/skipped_steps") != len(skipped):
        problems.append(f"train/skipped_steps {train[-1].get('train/skipped_steps')} at the end, {len(skipped)} skipped")
    for nan in (nan for nan in nans if nan.get("crash")):
        what = f"the failure of rank {nan['fail']}" if "fail" in nan else "the NaN"
        if nan["resumed"] >= nan["step"]:
            problems.append(f"{what} at step {nan['step']} stopped the run, yet a checkpoint at step {nan['resumed']} "
                            f"was left")
        if not nan["told"]:
            problems.append(f"{what} at step {nan['step']} did not name the checkpoint to go on from")
    return problems


def checkpoint_problems(out: Path, settings: dict, *, steps: list[int], stops: list[int], evals: list[dict],
                        due: list[int], output: str | None) -> list[str]:
    """The rules about checkpoints the run in `out` broke: the checkpoints left are the newest
    `--save_total_limit` of those saved (at the save cadence, at each launch's stop, at the last
    step, and with --save_steps and --export best at each new best eval; after a branch, those it
    found at or before its step and those saved past it) plus the best by eval top-1 among them,
    all complete; the export (from the last launch's `output`) is the best eval's checkpoint among
    them (the newest among equals), or with --export last the last step's."""
    top1 = {r["step"]: r["eval/top1"] for r in evals}
    if every := settings.get("save_steps"):
        saved, best = {s for s in steps if s % every == 0}, None
        for s in sorted(top1) if settings.get("export", "best") == "best" else []:
            if best is None or top1[s] >= best:
                saved, best = saved | {s}, top1[s]
    else:
        saved = set(due)  # the eval cadence
    saved = sorted(saved | set(stops) | {steps[-1]})
    if branch := (settings.get("branches") or [None])[-1]:  # what the last branch found at or before its
        saved = [s for s in saved if s > branch["from"] or s in branch["present"]]  # step (the rest was pruned)
    scored = [(top1[s], s) for s in saved if s in top1]
    kept = set(saved[-settings.get("keep", 2):]) | ({max(scored)[1]} if scored else set())
    complete, partial = complete_checkpoints(out / "checkpoints")
    left = [checkpoint_info(p)["step"] for p in complete]
    problems = [f"incomplete checkpoints left: {', '.join(p.name for p in partial)}"] if partial else []
    if left != sorted(kept):
        problems.append(f"checkpoints left at steps {left}, expected {sorted(kept)} (saved at {saved})")
    if output is None:
        return problems
    if settings.get("export", "best") == "last":
        want, why = steps[-1], "the last"
    elif scored:  # (the best eval, unless a branch found its checkpoint pruned)
        want, why = max(scored)[1], "the best by eval top-1"
    else:
        return problems
    why += ", its weight average" if settings.get("ema_decay") else ""
    exported = re.search(r"\(from step-(\d+), ([^)]+)\)", output)
    if not exported or (int(exported.group(1)), exported.group(2)) != (want, why):
        problems.append(f"exported {exported.group(0) if exported else 'nothing'}, expected step {want} ({why})")
    return problems


def nan_shown(result: dict) -> str:
    """The trial's NaN faults and failures for its report line: where each came and what it did."""
    what = [f"rank {nan['fail']} {'killed' if nan.get('killed') else 'failed'} at {nan['step']}"
            + " (the others waiting)" * nan.get("hang", False) if "fail" in nan
            else f"NaN at {nan['step']} " + ("stopped it" if nan.get("crash") else "skipped" if nan["skipped"] else
                                             "one micro batch") for nan in result.get("nans", [])]
    return f"; {', '.join(what)}" if what else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs") / "soak")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", type=Path, default=None, help="the report (default: OUT/soak.json)")
    parser.add_argument("--preempt", action="store_true",
                        help="stop some launches with SIGTERM to the whole job at a random step (as a scheduler "
                             "preempts it) instead of --max_steps; where the stop falls depends on timing")
    parser.add_argument("--compile", action="store_true", help="every launch with --compile (torch.compile)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out)
    rng, report = random.Random(args.seed), []
    gpus = torch.cuda.device_count()  # CPU ranks, or one per GPU (nodes of one machine would share them)
    for n in tqdm(range(args.trials), unit="trial", disable=None):
        settings = draw(rng, precision=args.precision, max_ranks=gpus or 4, split=not gpus, preempt=args.preempt,
                         compile=args.compile)
        result = trial(args.out / f"trial-{args.seed}-{n}", settings, data=args.out, rng=rng)
        report.append(result)
        back = {b["launch"]: f"(from step {b['from']}) " for b in result.get("branches", [])}
        changes = [c + [z] * bool(switch) for c, z, switch
                   in zip(settings["changes"], zero_configs(settings), settings["zero_switch"])]
        launches = " -> ".join(back.get(n, "") + "srun " * s + f"{k}n:" * (k > 1) + f"{r}x{m}x{a}"
                               + f" [{' '.join(c)}]" * bool(c) + " (SIGTERM)" * p for n, ((r, m, a), k, p, c, s)
                               in enumerate(zip(result["launches"], settings["nodes"], result["preempt"] + [False],
                                                changes, settings["srun"]), start=1))
        verdict = ("FAILED " + result["failed"].splitlines()[0] if "failed" in result else
                   "; ".join(result["problems"]) or f"ok, {result['steps']} steps")
        tqdm.write(f"trial {n}: {settings['model']} {settings['zero']} {settings['precision']} "
                   + "W&B offline " * (settings["wandb"] == "offline") +
                   f"--epochs {settings['epochs']} {' '.join(flags(settings))} ranks x micro x accum "
                   f"{launches} (stops at {result['stops']}{nan_shown(result)}): {verdict}")
        (args.json or args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    broken = [r for r in report if r.get("problems") or "failed" in r]
    print(f"soak: {len(report) - len(broken)} of {len(report)} trials held every rule; report in "
          f"{args.json or args.out / 'soak.json'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
