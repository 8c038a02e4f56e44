"""Checkpoints that are complete or invisible, and the export to a `save_pretrained` folder.

Layout under OUTPUT/checkpoints/:

    step-00000120/            DeepSpeed's files (model, optimizer and scheduler states per rank)
        trainer_state_rank0.pt  everything else this rank needs to resume (loader, RNG, step, ...)
        ema.pt                the weight average (--ema_decay), whole, by parameter and buffer name
        complete.json         written last, after every rank finished writing: the step, its eval
                              top-1, the ranks, and every file's size (checked before a resume)
    latest                    the newest complete tag (DeepSpeed's format), replaced by rename
OUTPUT/model_files/           the model's config and image processor, for exporting any checkpoint
    frozen.safetensors        a --freeze_backbone run in bf16/fp16: the frozen weights in fp32

A folder without `complete.json` is a save that was interrupted: never resumed from, reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.shards import write_atomic  # noqa: F401 (train/ imports it from here)

MARKER = "complete.json"
MODEL_FILES = "model_files"  # OUTPUT/model_files/: the run's model config and image processor
MODEL_STATES = "*model_states.pt"  # DeepSpeed's (one; ZeRO-3: one per rank): module, scheduler, metadata
EMA_FILE = "ema.pt"  # the weight average (train/ema.py), fp32 tensors by parameter and buffer name
FROZEN_FILE = "frozen.safetensors"  # in MODEL_FILES: a frozen backbone's weights as loaded, fp32


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


class WriteError(RuntimeError):
    """Writing a checkpoint, the export or the metrics failed (no space, permission, a folder that
    vanished); the message names the file and the cause."""


def write_failure(error: BaseException) -> str | None:
    """The cause, if `error` is a failed write: an OSError, or torch's zip writer's RuntimeError
    (a full disk reads `[enforce fail at inline_container.cc] . unexpected pos`); else None."""
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    text = str(error)
    if isinstance(error, RuntimeError) and any(s in text for s in ("inline_container", "PytorchStreamWriter",
                                                                     "file write failed")):
        return f"the file could not be written, most likely no space left (torch: {text.splitlines()[0][:120]})"
    return None


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_checkpoint(engine, *, root: Path, step: int, state: dict, rank: int, top1: float | None,
                    keep: int, average: dict | None = None) -> Path:
    """Saves DeepSpeed's state, this rank's `state` and (rank 0) the weight `average`; marks the
    folder complete once all ranks are done.

    Then prunes: keeps the newest `keep` complete checkpoints and the best by top-1. `root` is on a
    file system every node sees (DeepSpeed writes the model states on rank 0 only and every rank's
    optimizer partition beside them), so everything that changes the folder as a whole (removing
    an interrupted save, the marker, `latest`, pruning) is done by global rank 0 alone.
    """
    path = checkpoint_path(root, step)
    tag = path.name
    _poison_for_tests(engine, step)
    if not weights_are_finite(engine):
        raise CheckpointError(f"step {step}: the weights are not finite; not saving {path}")
    if rank == 0 and path.exists():  # left by an interrupted save of this step: start it clean
        shutil.rmtree(path)
    dist.barrier()
    _fail_for_tests(step, path)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(state, path / f"trainer_state_rank{rank}.pt")
    if rank == 0 and average is not None:
        torch.save(average, path / EMA_FILE)
    _pause_for_tests(step)
    dist.barrier()
    if rank == 0:
        write_atomic(path / MARKER, json.dumps({"step": step, "top1": top1, "world_size": dist.get_world_size(),
                                                 "time": time.time(), "files": file_sizes(path)}))
        write_atomic(root / "latest", tag)
        _prune(root, keep=keep)
    dist.barrier()
    return path


def file_sizes(path: Path) -> dict[str, int]:
    """The size of every file in the checkpoint `path` (its marker aside), by path relative to it."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(Path(path).rglob("*"))
            if f.is_file() and f.name != MARKER}


def damage(path: Path) -> str | None:
    """What is wrong with the files of the complete checkpoint `path`, or None: one missing or of
    another size than the save wrote (a copy cut short, a file replaced; checkpoints from before
    the sizes were recorded: not checked), or a torch file whose zip directory is unreadable. Cheap
    (no file is read through); `unreadable` checks the contents."""
    try:
        sizes = checkpoint_info(path).get("files", {})
    except (OSError, ValueError) as e:
        return f"{Path(path) / MARKER} cannot be read ({e})"
    for name, size in sizes.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{file} is missing (the save wrote {size:,} bytes)"
        if (actual := file.stat().st_size) != size:
            return f"{file} is {actual:,} bytes, the save wrote {size:,} (cut short or changed since)"
    for file in sorted(Path(path).rglob("*.pt")):
        try:
            if _zipped(file):
                zipfile.ZipFile(file).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{file} is no readable torch file ({e}): cut short or overwritten"
    return None


def unreadable(files: list[Path]) -> str | None:
    """The first of the torch `files` whose contents no longer match the checksums torch wrote
    (its zip records' CRC-32), or None. torch.load checks none of them: a changed byte in a
    tensor loads as a wrong weight or moment, silently."""
    for file in files:
        try:
            if _zipped(file):
                with zipfile.ZipFile(file) as archive:
                    if (record := archive.testzip()) is not None:
                        return f"{file}: its record {record} does not match its checksum (changed since the save)"
        except (zipfile.BadZipFile, OSError) as e:
            return f"{file} cannot be read ({e})"
    return None


def any_damage(path: Path) -> str | None:
    """What is wrong with the complete checkpoint `path` (`damage`, then every torch file read
    through: `unreadable`), or None: for one process about to read all of it (an export)."""
    return damage(path) or unreadable(sorted(Path(path).rglob("*.pt")))


def _zipped(file: Path) -> bool:
    """Whether `file` is in torch's zip format (the default since torch 1.6; the legacy one has no
    directory to check)."""
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def complete_checkpoints(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete, partial) checkpoint folders under `root`, oldest first."""
    folders = sorted(p for p in Path(root).glob("step-*") if p.is_dir())
    return [p for p in folders if (p / MARKER).is_file()], [p for p in folders if not (p / MARKER).is_file()]


def set_aside(root: Path, *, resume: Path, into: Path) -> list[Path]:
    """Moves the complete checkpoints under `root` that a run resuming from `resume` does not
    continue into the folder `into`, and returns where they went: those after `resume` when it is
    one of them (a run branching off an earlier step), all of them when it is another run's. Left
    in place, they would pass for this run's: `--resume auto` would go on from a later step of the
    abandoned line, and the pruning and `--export best` would weigh its evals."""
    here = Path(resume).resolve().parent == Path(root).resolve()
    others = [p for p in complete_checkpoints(root)[0] if not here or p.name > Path(resume).name]
    if others:
        into.mkdir(parents=True, exist_ok=True)
    moved = [path.rename(into / path.name) for path in others]
    if here and moved:
        write_atomic(Path(root) / "latest", Path(resume).name)
    return moved


def find_resume(resume: str | None, root: Path) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from (None: fresh start) and the partial ones that were skipped."""
    complete, partial = complete_checkpoints(root)
    if resume is None:
        return None, partial
    if resume == "auto":
        if complete and (why := damage(complete[-1])):
            raise CheckpointError(refusal(complete[-1], why, auto=True))
        return (complete[-1] if complete else None), partial
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"--resume {not_a_checkpoint(path)}")
    if why := damage(path):
        raise CheckpointError(refusal(path, why))
    return path, partial


def share_unreadable(path: Path, *, rank: int, world: int) -> str | None:
    """Why the checkpoint `path` cannot be resumed from (its refusal), found in this rank's share of
    its torch files (each rank reads 1/world of them through: their checksums), or None."""
    files = sorted(Path(path).rglob("*.pt"))[rank::world]
    return refusal(path, why) if (why := unreadable(files)) else None


def refusal(path: Path, why: str, *, auto: bool = False) -> str:
    """A damaged checkpoint `path` refused (`auto`: the newest, found by --resume auto), and what
    to do instead: restore the file, or go on from the complete checkpoint before it."""
    earlier = [p for p in complete_checkpoints(path.parent)[0] if p.name < path.name]
    what = "--resume auto: the newest complete checkpoint is damaged" if auto else f"--resume {path} is damaged"
    if not earlier:
        return f"{what}: {why}; restore the file, or " + ("start over (--overwrite_output_dir)" if auto else
                                                          "pass another checkpoint")
    return (f"{what}: {why}; restore the file, or go on from the complete checkpoint before it: --resume {earlier[-1]} "
            f"(resuming from an earlier checkpoint of its run sets the later ones aside in OUTPUT/abandoned/, "
            f"{path.name} with them)")


def checkpoints_under(path: Path) -> tuple[Path, list[Path]]:
    """(the folder, its complete checkpoints oldest first) of `path` itself or of `path`/checkpoints
    (a run's output dir), whichever holds some first; (path, []) where neither does."""
    for root in (path, path / "checkpoints"):
        complete, _ = complete_checkpoints(root)
        if complete:
            return root, complete
    return path, []


def not_a_checkpoint(path: Path) -> str:
    """Why `path` is no complete checkpoint, and which one to pass where it holds some: a run's
    output dir or its checkpoints folder (the newest complete of them), or an interrupted save."""
    if not path.is_dir():
        return f"{path} does not exist"
    root, complete = checkpoints_under(path)
    if complete:
        return (f"{path} holds checkpoints, and is none: pass one, e.g. the newest complete, {complete[-1]} "
                f"({len(complete)} in {root})")
    if path.name.startswith("step-"):
        complete, _ = complete_checkpoints(path.parent)
        return (f"{path} is an interrupted save (no {MARKER}: not every rank finished writing it); pass another"
                + (f", e.g. the newest complete, {complete[-1]}" if complete else ""))
    return f"{path} is not a checkpoint (no {MARKER}): pass OUTPUT/checkpoints/step-N of a training run"


def checkpoint_info(path: Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def record_top1(path: Path, top1: float) -> None:
    """Records the eval top-1 of a complete checkpoint evaluated after it was saved (the pruning and
    --export best read it from its marker)."""
    write_atomic(Path(path) / MARKER, json.dumps({**checkpoint_info(path), "top1": top1}))


def load_checkpoint(engine, path: Path, *, universal: Path | None = None) -> None:
    """Restores DeepSpeed's state from `path`, or from its `universal_checkpoint` form (a
    checkpoint saved by another number of ranks; the engine was made with `load_universal`).

    The optimizer's state (moments, step counts) and the schedule's position come from the
    checkpoint; the optimizer's hyperparameters (lr, weight decay, betas, eps) stay this run's, and
    the next step's learning rate is this run's schedule's at that position. DeepSpeed restores the
    saved param groups whole, which would silently ignore a new --lr or --weight_decay, and train
    the first resumed step at the old schedule's rate after a change of --epochs."""
    path = Path(path)
    ours = [{k: v for k, v in group.items() if k not in ("params", "lr", "step")}
            for group in engine.optimizer.param_groups]
    where = universal or path
    load_path, _ = engine.load_checkpoint(str(where.parent), tag=where.name)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
    if universal is not None:  # DeepSpeed restores parameters from it, not buffers (BatchNorm statistics)
        first = sorted(path.glob(MODEL_STATES))[0]  # every one holds the buffers whole
        saved = torch.load(first, map_location="cpu", weights_only=False)["module"]
        buffers = dict(engine.module.named_buffers())
        with torch.no_grad():
            for name in buffers.keys() & saved.keys():
                buffers[name].copy_(saved[name])
    groups = engine.optimizer.param_groups
    for group, hyperparameters in zip(groups, ours):
        group.update(hyperparameters)
    _set_scheduled_lr(engine.lr_scheduler, groups)


def universal_gaps(engine) -> list[tuple[list[str], int]]:
    """The parameters of each optimizer parameter group this rank holds no part of under ZeRO-1/2
    (a group of fewer values than the ranks' partitions, such as a frozen backbone's head bias):
    DeepSpeed's universal load fails on such a group (an IndexError in its
    load_hp_checkpoint_state_from_checkpoint_dir, which takes the group's step from its first
    part). ZeRO-3 loads them. Each as (parameter names, values)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [([names[id(p)] for p in group], sum(p.numel() for p in group))
            for group in getattr(engine.optimizer, "bit16_groups", [])
            if group and all(getattr(p, "_hp_mapping", None) is None for p in group)]


def universal_checkpoint(path: Path, *, into: Path, rank: int) -> Path:
    """DeepSpeed's universal form of the checkpoint `path` (made by global rank 0 with DeepSpeed's
    ds_to_universal into `into`/`path.name`; every rank waits for it): its optimizer state as
    whole tensors per parameter, which any number of ranks partitions anew. Removed by
    `drop_universal` once loaded."""
    out = Path(into) / Path(path).name
    failure = None
    if rank == 0:
        shutil.rmtree(into, ignore_errors=True)  # and what a run that crashed while loading left
        out.mkdir(parents=True)
        workers = str(max(1, min(4, len(os.sched_getaffinity(0)))))
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(path), "--output_folder", str(out), "--inject_missing_state",
                               "--num_extract_workers", workers, "--num_merge_workers", workers],
                              capture_output=True, text=True)
        if done.returncode:
            lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            failure = ([line for line in lines if "Error" in line] or lines or ["no output"])[-1]
        for states in Path(path).glob(MODEL_STATES) if not failure else ():
            if not (out / states.name).exists():  # ZeRO-1/2: not in the conversion, DeepSpeed reads them there
                shutil.copyfile(states, out / states.name)
    flag = [failure]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise CheckpointError(f"{path}: DeepSpeed could not convert it for another number of ranks "
                              f"(ds_to_universal: {flag[0]})")
    return out


def drop_universal(universal: Path, *, rank: int) -> None:
    """Removes what `universal_checkpoint` made, once every rank has loaded it."""
    dist.barrier()
    if rank == 0:
        shutil.rmtree(universal.parent, ignore_errors=True)


def _set_scheduled_lr(scheduler, groups: list[dict]) -> None:
    """Each group's learning rate as `scheduler` sets it at its current position."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # transformers' schedules
        scheduler.base_lrs = [group["initial_lr"] for group in groups]  # the saved ones were restored
        rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        scheduler._last_lr = rates
    elif scheduler is not None:  # DeepSpeed's: a function of last_batch_iteration and this run's config
        rates = scheduler.get_lr()
    else:
        return
    for group, rate in zip(groups, rates):
        group["lr"] = rate


def export_model(*, checkpoint: Path, config, processor, out: Path, average: bool = True,
                 frozen: Path | None = None) -> list[str]:
    """Writes `out`, a `save_pretrained` folder with fp32 weights consolidated from the ZeRO
    checkpoint (where it holds a weight average, and `average`, the averaged ones), the config
    (with id2label) and the image processor: what `transformers.pipeline` loads. A frozen
    backbone's weights, held in bf16/fp16 in the checkpoint, are taken in fp32 from `frozen` (a
    FROZEN_FILE) where they round to the checkpoint's. Returns what the export is besides ("its
    weight average", "the frozen backbone in fp32")."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints every step it takes
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    notes = [_frozen_in_fp32(weights, frozen)] if frozen is not None and frozen.is_file() else []
    averaged = average and (checkpoint / EMA_FILE).is_file()
    if averaged:  # the parameters that trained and the BatchNorm statistics (older checkpoints: parameters)
        weights.update(torch.load(checkpoint / EMA_FILE, map_location="cpu", weights_only=True))
    model = AutoModelForImageClassification.from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights are stored once in the checkpoint; anything else missing is a bug
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return ["its weight average"] * averaged + notes


def _frozen_in_fp32(weights: dict, frozen: Path) -> str:
    """Puts the fp32 weights of a frozen backbone (`frozen`, as the run loaded them) in place of
    the checkpoint's bf16 or fp16 ones, if every one rounds to the checkpoint's (the same backbone:
    not so where a run resumed another's checkpoint built from another model); what was done."""
    from safetensors.torch import load_file

    exact = load_file(frozen)
    for dtype in (torch.bfloat16, torch.float16):
        if all(name in weights and torch.equal(value.to(dtype).float(), weights[name])
               for name, value in exact.items()):
            weights.update(exact)
            return "the frozen backbone in fp32"
    return f"the frozen backbone as trained: {frozen} is of another model"


def save_frozen(weights: dict, out: Path) -> None:
    """A frozen backbone's weights as loaded, fp32 (export_model's `frozen`), written atomically."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({name: value.float().contiguous() for name, value in weights.items()}, str(tmp))
    os.replace(tmp, out)


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)


def _prune(root: Path, *, keep: int) -> None:
    complete, _ = complete_checkpoints(root)
    scored = [(checkpoint_info(p).get("top1"), p) for p in complete]
    best = max((s for s in scored if s[0] is not None), key=lambda s: (s[0], s[1].name), default=(None, None))[1]
    for path in complete[:-keep] if keep > 0 else complete:
        if path != best and path != complete[-1]:
            shutil.rmtree(path, ignore_errors=True)


def weights_are_finite(engine) -> bool:
    """Whether every rank's parameters (its ZeRO-3 partitions, or the full copies) and buffers are finite."""
    tensors = [own_elements(p) for p in engine.module.parameters()]
    tensors += [b for b in engine.module.buffers() if b.is_floating_point()]
    finite = all(torch.isfinite(t).all() for t in tensors)
    flag = torch.tensor([float(finite)], device=next(engine.module.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def own_elements(param: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a parameter: under ZeRO-3 its partition, less the padding that rounds
    the parameter up to equal partitions (DeepSpeed leaves it uninitialized: any bits, NaN's too)."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    start = part.numel() * dist.get_rank(group=param.ds_process_group)
    return part.narrow(0, 0, max(0, min(part.numel(), param.ds_numel - start)))


def _fail_for_tests(step: int, path: Path) -> None:
    """Fault injection where no small file system can be mounted: TRAIN_ENOSPC_AT_STEP=N makes the
    save of step N fail as a full disk does."""
    if os.environ.get("TRAIN_ENOSPC_AT_STEP") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _poison_for_tests(engine, step: int) -> None:
    """Fault injection before a save: TRAIN_NAN_PADDING=1 sets the padding of ZeRO-3's partitions
    (uninitialized memory: it may hold any bits) to NaN; TRAIN_NAN_WEIGHT_AT_STEP=N puts a NaN in
    one of rank 0's weights before the save of step N."""
    with torch.no_grad():
        if os.environ.get("TRAIN_NAN_PADDING") == "1":
            for param in engine.module.parameters():
                if hasattr(param, "ds_tensor"):
                    param.ds_tensor[own_elements(param).numel():] = float("nan")
        if os.environ.get("TRAIN_NAN_WEIGHT_AT_STEP") == str(step) and dist.get_rank() == 0:
            own_elements(next(engine.module.parameters())).view(-1)[0] = float("nan")


def _pause_for_tests(step: int) -> None:
    """Fault injection: TRAIN_PAUSE_SAVE_AT_STEP=N makes the save of step N wait after every rank
    wrote its files and before it is marked complete, so that a test can kill the job mid-save."""
    if os.environ.get("TRAIN_PAUSE_SAVE_AT_STEP") == str(step):
        time.sleep(600)
