"""What a resumed run must keep from its checkpoint, and what it may change.

Kept, else a configuration error that says what to pass: the seed and the train shards (each
epoch's order), the precision, the ZeRO stage (1 and 2 share DeepSpeed's checkpoint format; 3 has
its own), the optimizer, and layer-wise lr decay on or off (its parameter groups; DeepSpeed fails
deep inside its loader on any of these). Everything
else in `training_recipe` may change (ZeRO-1 <-> 2, CPU offload on or off included): this run's
values apply from its first step and the banner lists them (DeepSpeed alone would restore the saved learning rate and weight decay, silently
ignoring new ones). Another number of ranks or another micro batch goes on with the samples of the
epoch that no rank has read yet, split afresh (`pipelines.loader.resplit`), and with DeepSpeed's
optimizer state partitioned anew (`train.checkpoint.universal_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipelines.loader import resplit
from train.args import TrainArgs
from train.checkpoint import checkpoint_info

AUGMENTATION = ("crop_scale", "hflip", "color_jitter", "auto_augment")  # the DALI train graph's options
KEPT = ("precision", "optimizer", "freeze_backbone")  # never change; the ZeRO stage only between 1 and 2 (recipe_changes)
GROUPING = ("ranks", "micro_batch_size")  # how an epoch's samples are dealt out


def data_order(args: TrainArgs, ds_config: dict, manifest: dict | None) -> dict:
    """What fixes each epoch's order: the seed (the permutations, the augmentation) and the train
    shards (a fingerprint of their manifest entries: names, sizes, sample counts, sha256); and the
    micro batch, the batch size each rank's loader position counts in."""
    shards = json.dumps((manifest or {}).get("splits", {}).get("train", {}).get("shards"), sort_keys=True)
    return {"micro_batch_size": ds_config.get("train_micro_batch_size_per_gpu"), "seed": args.seed,
            "train_shards": hashlib.sha256(shards.encode()).hexdigest()[:16]}


def training_recipe(args: TrainArgs, ds_config: dict, *, world_size: int, precision: str, total_steps: int,
                    warmup_steps: int, image_size: tuple[int, int] | None) -> dict:
    """The run's optimization and augmentation settings as resolved (the DeepSpeed config's values
    where it sets them), saved with every checkpoint."""
    optimizer, zero = ds_config.get("optimizer", {}), ds_config.get("zero_optimization", {})
    schedule = ds_config["scheduler"]["type"] if "scheduler" in ds_config else args.lr_scheduler
    offload = [f"{part} to {device}" for part in ("optimizer", "param")
               if (device := zero.get(f"offload_{part}", {}).get("device", "none")) != "none"]
    return {"precision": precision, "zero_stage": zero.get("stage", 0), "offload": ", ".join(offload) or "none",
            "optimizer": optimizer.get("type"),
            "ranks": world_size, "micro_batch_size": ds_config.get("train_micro_batch_size_per_gpu"),
            "grad_accum": ds_config["gradient_accumulation_steps"], "steps": total_steps,
            "warmup_steps": warmup_steps, "lr_scheduler": schedule,
            **{key: optimizer.get("params", {}).get(key) for key in ("lr", "weight_decay", "betas", "eps")},
            "max_grad_norm": ds_config.get("gradient_clipping"), "layer_decay": args.layer_decay,
            "freeze_backbone": args.freeze_backbone, "image_size": list(image_size) if image_size else None,
            "ema_decay": args.ema_decay, "drop_path": args.drop_path,
            **{key: getattr(args, key) for key in (*AUGMENTATION, "label_smoothing", "mixup_alpha", "cutmix_alpha",
                                                     "random_erase")}}


def restart_hint(path: Path) -> str:
    return f"or start a new run from its weights: `python tools/export_checkpoint.py {path} OUT`, then --model OUT"


def read_trainer_state(path: Path, *, rank: int, world: int, classes: list[str], order: dict,
                       problems: list[str]) -> dict:
    """This rank's trainer state in the checkpoint `path` (rank 0's, when another number of ranks
    saved it), with "ranks": how many did, after checking that this run can go on with its data
    order."""
    saved_world = checkpoint_info(path)["world_size"]
    state = torch.load(path / f"trainer_state_rank{rank if saved_world == world else 0}.pt", weights_only=False)
    state["ranks"] = saved_world
    if classes and state["classes"] != len(classes):
        problems.append(f"--resume {path}: trained on {state['classes']} classes, --data has {len(classes)}")
    saved = state.setdefault("order", order)  # checkpoints from before the check carry none
    if saved["seed"] != order["seed"]:
        problems.append(f"--resume {path}: saved by a run with --seed {saved['seed']}, this run has --seed "
                        f"{order['seed']}; resume with --seed {saved['seed']} (each epoch's order and the "
                        f"augmentation follow it), {restart_hint(path)}")
    if classes and saved["train_shards"] != order["train_shards"]:
        problems.append(f"--resume {path}: trained on other train shards than --data holds (their manifest "
                        f"entries differ); resume with the --data it was trained on, {restart_hint(path)}")
    return state


def loader_state(state: dict, args: TrainArgs, *, world: int, order: dict) -> dict | None:
    """The train loader's state to resume from the checkpoint whose trainer `state` this is:
    resplit when it was saved by another number of ranks or with another micro batch; without
    DALI's part when the augmentation changed (the loader then goes on from its epoch and step,
    the augmentation seeded afresh)."""
    saved = state.get("train_loader")
    if not saved:
        return saved
    if regrouped(state, world=world, order=order):
        return resplit(saved, world_size=state["ranks"], batch_size=state["order"]["micro_batch_size"])
    return {**saved, "dali": None} if augmentation_changed(state, args) else saved


def regrouped(state: dict, *, world: int, order: dict) -> bool:
    """Whether the checkpoint whose trainer `state` a run resumes dealt its epochs out otherwise:
    another number of ranks, or another micro batch."""
    return bool(state) and (state["ranks"], state["order"]["micro_batch_size"]) != (world, order["micro_batch_size"])


def augmentation_changed(state: dict, args: TrainArgs) -> bool:
    """Whether this run's train augmentation differs from the checkpoint's: its DALI graph then has
    other operators, and DALI's checkpoint (the augmentation's random state) cannot be restored."""
    saved = state.get("recipe")
    return bool(saved) and any(saved[key] != getattr(args, key) for key in AUGMENTATION)


def recipe_changes(state: dict, recipe: dict, *, path: Path | None, problems: list[str],
                   size_bound: bool = False) -> list[str]:
    """`name old -> new` for each setting this run changes from those of the checkpoint whose trainer
    `state` it resumes; the ones DeepSpeed's checkpoint cannot follow are noted as problems instead
    (the image size where the model's parameter shapes follow it, `size_bound`), and so is a
    checkpoint past this run's last step (when known: None, no loader to count an epoch).
    Nothing to compare for a fresh run or a checkpoint from before the recipe was saved."""
    if state and recipe["steps"] is not None and state["step"] > recipe["steps"]:
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
    decay = saved.get("layer_decay", 1.0)  # (a checkpoint from before the flag: without it)
    if (decay == 1.0) != (recipe["layer_decay"] == 1.0):
        problems.append(f"--resume {path}: saved by a run with --layer_decay {decay:g}, this one has "
                        f"{recipe['layer_decay']:g}; the optimizer's parameter groups differ (a pair per layer with "
                        f"it, else one pair): resume with --layer_decay {decay:g} (any value but 1 if it was not 1), "
                        f"{restart_hint(path)}")
    if saved.get("freeze_backbone", False) != recipe["freeze_backbone"]:  # (from before the flag: not frozen)
        problems.append(f"--resume {path}: " + (
            "saved by a run training every parameter, this one has --freeze_backbone; resume without it"
            if recipe["freeze_backbone"] else
            "saved by a run with --freeze_backbone, this one trains every parameter; resume with it")
            + f" (the optimizer's state is of the parameters it trained), {restart_hint(path)}")
    size = saved.get("image_size")
    if size_bound and size and recipe.get("image_size") and size != recipe["image_size"]:
        problems.append(f"--resume {path}: trained on {size[0]}x{size[1]} images, this run's are "
                        f"{recipe['image_size'][0]}x{recipe['image_size'][1]}, and the model's position embeddings "
                        f"are sized for its images: resume with "
                        + (f"--image_size {size[0]}" if size[0] == size[1] else "the processor it was trained with")
                        + f", {restart_hint(path)}")
    changed = [key for key, value in recipe.items() if key not in KEPT and key in saved and saved[key] != value
               and not (key == "image_size" and size_bound)]
    notes = {([key for key in changed if key in group] or [None])[-1]: note for group, note in (
        (AUGMENTATION, "the augmentation's random state starts afresh"),
        (GROUPING, "the samples of the epoch that no rank has read yet are split afresh"))}
    return [f"{key} {_shown(saved[key])} -> {_shown(recipe[key])}" + (f" ({notes[key]})" if key in notes else "")
            for key in changed]


def _shown(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
