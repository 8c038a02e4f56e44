"""The DeepSpeed config, resolved: "auto" values filled from the arguments, one batch arithmetic.

As in Hugging Face Trainer's DeepSpeed integration, a config value may be "auto"; then the CLI
value (or its default) is used. A number in the config and a different number on the CLI is an
error rather than a silent choice. The batch identity that DeepSpeed enforces,
micro x accumulation x world = train batch, is checked here first, with a message that says
what to change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from train.args import TrainArgs

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"micro_batch_size": 32, "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.05, "max_grad_norm": 1.0}
HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def load_ds_config(path: str | Path, problems: list[str]) -> dict:
    """The JSON at `path` (relative to the working dir, else to the repo), or {} with the reason
    appended to `problems`."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    try:
        return json.loads(path.read_text())
    except OSError as e:
        problems.append(f"--ds_config {path}: {e.strerror} (the configs ship in ds_configs/)")
    except json.JSONDecodeError as e:
        problems.append(f"--ds_config {path}: not valid JSON ({e})")
    return {}


def hardware_precision(device_type: str) -> str:
    """bf16 where the hardware runs it natively, else fp16 on GPUs and fp32 on CPUs."""
    if device_type == "cuda":
        # emulated bf16 (V100, T4) counts as supported unless asked not to: several times slower than fp16
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolve_batch(raw: dict, args: TrainArgs, *, world_size: int, problems: list[str], training: bool = True) -> dict:
    """A copy of `raw` with the batch sizes, clipping and optimizer filled; checks the arithmetic,
    and that ZeRO is on. An eval (training=False) reads the micro batch alone: the config that
    trained a model evaluates it on any number of ranks, whatever it says of the optimizer."""
    config = copy.deepcopy(raw)
    fill = _filler(args, problems)
    micro = _count(fill, config, "train_micro_batch_size_per_gpu", "micro_batch_size", path=args.ds_config,
                   problems=problems)
    if not training:
        return config
    if raw and not raw.get("zero_optimization", {}).get("stage"):
        # DeepSpeed's own optimizers then: bf16 fails to build on CPU, and the checkpoints are
        # not ZeRO's, which the export (zero_to_fp32) and resuming on other ranks read
        problems.append(f"{args.ds_config}: ZeRO is off (zero_optimization.stage 0 or absent); use stage 1 "
                        f"(ds_configs/zero1.json: data parallel, each rank holding its part of the optimizer state)")
    accum = _count(fill, config, "gradient_accumulation_steps", "grad_accum", path=args.ds_config, problems=problems)
    fill(config, "gradient_clipping", "max_grad_norm")
    train_batch = config.get("train_batch_size", "auto")
    if micro and accum:
        product = micro * accum * world_size
        if train_batch == "auto":
            config["train_batch_size"] = product
        elif train_batch != product:
            hint = (f"--grad_accum {train_batch // (micro * world_size)}" if train_batch % (micro * world_size) == 0
                    else "\"auto\" in the config, or a train_batch_size that micro x world divides")
            problems.append(
                f"{args.ds_config}: train_batch_size {train_batch} != micro batch {micro} x grad_accum {accum} "
                f"x world size {world_size} = {product}; use {hint}"
            )
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    fill(params, "lr", "lr", where="optimizer.params.lr")
    fill(params, "weight_decay", "weight_decay", where="optimizer.params.weight_decay")
    for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
        if params.get(key, "auto") == "auto":
            params[key] = default
    return config


def _count(fill, config: dict, key: str, name: str, *, path: str, problems: list[str]) -> int | None:
    """A batch count of the config filled (the flag's range is checked with every flag's); None
    when the config's own is not a whole number of 1 or more."""
    given = config.get(key, "auto")
    value = fill(config, key, name)
    if given != "auto" and (not isinstance(given, int) or isinstance(given, bool) or given < 1):
        problems.append(f"{path}: {key} is {given}; a whole number, 1 or more, or \"auto\"")
        return None
    return value if isinstance(value, int) and value >= 1 else None


def resolve_precision(config: dict, args: TrainArgs, *, device_type: str, problems: list[str]) -> str:
    """Sets bf16/fp16 `enabled` in `config`; returns "bf16", "fp16" or "fp32"."""
    explicit = [p for p in ("bf16", "fp16") if config.get(p, {}).get("enabled") is True]
    precision = args.precision
    if precision == "auto":
        precision = explicit[0] if explicit else hardware_precision(device_type)
    elif explicit and explicit != [precision]:
        problems.append(f"{args.ds_config}: {explicit[0]} is enabled but --precision is {precision}; "
                        f"set \"enabled\": \"auto\" in the config or drop --precision")
    if precision == "fp16" and device_type != "cuda" and not get_accelerator().is_fp16_supported():
        problems.append("--precision fp16 needs a GPU (DeepSpeed has no fp16 on this CPU); use bf16 or fp32")
    for p in ("bf16", "fp16"):
        section = config.setdefault(p, {})
        section["enabled"] = precision == p
        if p == "fp16" and section.get("loss_scale", "auto") == "auto":
            section["loss_scale"] = 0  # dynamic loss scaling
    return precision


def resolve_optimizer(config: dict, *, device_type: str) -> None:
    """On CPU ranks, DeepSpeed's Adam or AdamW runs as torch's (the config's `torch_adam`, unless it
    says otherwise): DeepSpeed's own CPU Adams are C++ ops compiled on a machine's first run (its
    fused Adam 75 s on 2 idle cores, ZeRO-Offload's CPU Adam 82 s, before the first step) for the
    same update. GPU runs keep DeepSpeed's: its fused Adam, and the CPU Adam where they offload."""
    optimizer = config.get("optimizer", {})
    if device_type == "cpu" and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)


def resolve_schedule(config: dict, args: TrainArgs, *, total_steps: int, warmup_steps: int):
    """The learning-rate schedule. A `scheduler` section in the config is DeepSpeed's, its "auto"
    values filled here (returns None). Without one, --lr_scheduler picks Hugging Face's
    warmup-then-decay schedule (returns a factory for `deepspeed.initialize(lr_scheduler=...)`):
    step k (from 1) uses lr x (k - 1)/warmup during warmup, then decays towards 0, as in HF Trainer.
    """
    config.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress
    config.setdefault("wall_clock_breakdown", False)
    if "scheduler" not in config:
        from transformers import get_scheduler

        name = HF_SCHEDULERS[args.lr_scheduler]
        return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                               num_training_steps=total_steps)
    params = config["scheduler"].setdefault("params", {})
    values = {"total_num_steps": total_steps, "warmup_num_steps": warmup_steps,
              "warmup_max_lr": config["optimizer"]["params"]["lr"], "warmup_min_lr": 0.0, "warmup_type": "linear"}
    for key, value in values.items():
        if params.get(key) == "auto":
            params[key] = value
    return None


def find_autos(config: dict, prefix: str = "") -> list[str]:
    """The dotted paths of values still "auto" (a config key this trainer does not know)."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += find_autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


def _filler(args: TrainArgs, problems: list[str]):
    def fill(section: dict, key: str, name: str, where: str | None = None):
        cli, value = getattr(args, name), section.get(key, "auto")
        if value == "auto":
            section[key] = DEFAULTS[name] if cli is None else cli
        elif cli is not None and cli != value:
            problems.append(f"{args.ds_config}: {where or key} is {value} but --{name} is {cli}; "
                            f"drop one, or set \"auto\" in the config")
        return section[key]

    return fill
