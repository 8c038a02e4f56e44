"""What a resumed run must keep from its checkpoint, and what it may change.

Kept, else a configuration error that says what to pass: the world size, the micro batch, the seed
and the train shards (each rank's data order resumes at a batch number), the precision, the ZeRO
stage (1 and 2 share DeepSpeed's checkpoint format; 3 has its own) and the optimizer (DeepSpeed
fails deep inside its loader on any of these). Everything else in `training_recipe` may change:
this run's values apply from its first step and the banner lists them (DeepSpeed alone would
restore the saved learning rate and weight decay, silently ignoring new ones).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from train.args import TrainArgs
from train.checkpoint import checkpoint_info

AUGMENTATION = ("crop_scale", "hflip", "color_jitter", "auto_augment")  # the DALI train graph's options
KEPT = ("precision", "zero_stage", "optimizer")


def data_order(args: TrainArgs, ds_config: dict, manifest: dict | None) -> dict:
    """What fixes a rank's data order besides the world size: the micro batch (the loader resumes
    at a batch number), the seed (the epochs' permutations, the augmentation) and the train shards
    (a fingerprint of their manifest entries: names, sizes, sample counts, sha256)."""
    shards = json.dumps((manifest or {}).get("splits", {}).get("train", {}).get("shards"), sort_keys=True)
    return {"micro_batch_size": ds_config.get("train_micro_batch_size_per_gpu"), "seed": args.seed,
            "train_shards": hashlib.sha256(shards.encode()).hexdigest()[:16]}


def training_recipe(args: TrainArgs, ds_config: dict, *, precision: str, total_steps: int, warmup_steps: int) -> dict:
    """The run's optimization and augmentation settings as resolved (the DeepSpeed config's values
    where it sets them), saved with every checkpoint."""
    optimizer, zero = ds_config.get("optimizer", {}), ds_config.get("zero_optimization", {})
    schedule = ds_config["scheduler"]["type"] if "scheduler" in ds_config else args.lr_scheduler
    return {"precision": precision, "zero_stage": zero.get("stage", 0), "optimizer": optimizer.get("type"),
            "grad_accum": ds_config["gradient_accumulation_steps"], "steps": total_steps,
            "warmup_steps": warmup_steps, "lr_scheduler": schedule,
            **{key: optimizer.get("params", {}).get(key) for key in ("lr", "weight_decay", "betas", "eps")},
            "max_grad_norm": ds_config.get("gradient_clipping"),
            **{key: getattr(args, key) for key in (*AUGMENTATION, "label_smoothing", "mixup_alpha", "cutmix_alpha")}}


def restart_hint(path: Path) -> str:
    return f"or start a new run from its weights: `python tools/export_checkpoint.py {path} OUT`, then --model OUT"


def read_trainer_state(path: Path, *, rank: int, world: int, classes: list[str], order: dict,
                       problems: list[str]) -> dict:
    """This rank's trainer state in the checkpoint `path`, after checking that this run can go on
    with its data order ({} with the problem noted when the world size differs)."""
    info = checkpoint_info(path)
    if info["world_size"] != world:
        problems.append(f"--resume {path}: saved by {info['world_size']} ranks, this run has {world}; resume with "
                        f"{info['world_size']} ranks (the data order and optimizer partitions are per rank), "
                        f"{restart_hint(path)}")
        return {}
    state = torch.load(path / f"trainer_state_rank{rank}.pt", weights_only=False)
    if classes and state["classes"] != len(classes):
        problems.append(f"--resume {path}: trained on {state['classes']} classes, --data has {len(classes)}")
    saved = state.get("order", order)  # checkpoints from before the check carry none
    if order["micro_batch_size"] is not None and saved["micro_batch_size"] != order["micro_batch_size"]:
        problems.append(f"--resume {path}: saved with micro batch {saved['micro_batch_size']}, this run has "
                        f"{order['micro_batch_size']}; resume with --micro_batch_size {saved['micro_batch_size']} "
                        f"(a rank's data order resumes in batches of it), {restart_hint(path)}")
    if saved["seed"] != order["seed"]:
        problems.append(f"--resume {path}: saved by a run with --seed {saved['seed']}, this run has --seed "
                        f"{order['seed']}; resume with --seed {saved['seed']} (each epoch's order and the "
                        f"augmentation follow it), {restart_hint(path)}")
    if classes and saved["train_shards"] != order["train_shards"]:
        problems.append(f"--resume {path}: trained on other train shards than --data holds (their manifest "
                        f"entries differ); resume with the --data it was trained on, {restart_hint(path)}")
    return state


def augmentation_changed(state: dict, args: TrainArgs) -> bool:
    """Whether this run's train augmentation differs from the checkpoint's: its DALI graph then has
    other operators, and DALI's checkpoint (the augmentation's random state) cannot be restored."""
    saved = state.get("recipe")
    return bool(saved) and any(saved[key] != getattr(args, key) for key in AUGMENTATION)


def recipe_changes(state: dict, recipe: dict, *, path: Path | None, problems: list[str]) -> list[str]:
    """`name old -> new` for each setting this run changes from those of the checkpoint whose trainer
    `state` it resumes; the ones DeepSpeed's checkpoint cannot follow are noted as problems instead,
    and so is a checkpoint past this run's last step. Nothing to compare for a fresh run or a
    checkpoint from before the recipe was saved."""
    if state and state["step"] > recipe["steps"]:
        problems.append(f"--resume {path}: saved at step {state['step']}, past this run's last step "
                        f"{recipe['steps']}; the steps count from the start of the run (--max_steps "
                        f"{state['step'] + recipe['steps']} trains {recipe['steps']} more)")
    saved = state.get("recipe")
    if not saved:
        return []
    if saved["precision"] != recipe["precision"]:
        problems.append(f"--resume {path}: saved by a {saved['precision']} run, this one is {recipe['precision']}; "
                        f"resume with --precision {saved['precision']} (DeepSpeed's optimizer checkpoint is per "
                        f"precision), {restart_hint(path)}")
    if saved["zero_stage"] != recipe["zero_stage"] and {saved["zero_stage"], recipe["zero_stage"]} != {1, 2}:
        problems.append(f"--resume {path}: saved under ZeRO-{saved['zero_stage']}, this run's --ds_config has "
                        f"ZeRO-{recipe['zero_stage']}; resume with a ZeRO-{saved['zero_stage']} config (stages 1 and 2 "
                        f"share a checkpoint format, 3 has its own), {restart_hint(path)}")
    if saved["optimizer"] != recipe["optimizer"]:
        problems.append(f"--resume {path}: saved with the optimizer {saved['optimizer']}, this run's --ds_config has "
                        f"{recipe['optimizer']}; resume with {saved['optimizer']}, {restart_hint(path)}")
    changed = [key for key, value in recipe.items() if key not in KEPT and saved.get(key) != value]
    last_augmentation = ([key for key in changed if key in AUGMENTATION] or [None])[-1]
    return [f"{key} {_shown(saved.get(key))} -> {_shown(recipe[key])}"
            + (" (the augmentation's random state starts afresh)" if key == last_augmentation else "")
            for key in changed]


def _shown(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
