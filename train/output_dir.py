"""The output dir: claimed by one run, checked to be shared by every rank, the checkpoint to
resume from agreed, and what a resumed run does not continue set aside."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from train.args import ConfigError, TrainArgs
from train.checkpoint import CheckpointError, checkpoint_info, complete_checkpoints, find_resume, set_aside
from train.distributed import agree
from train.evaluation import CONFUSION_FILE, PREDICTIONS_FILE, RESULTS_FILE
from train.metrics import split_log

MODEL_EXPORT = "model"  # OUTPUT/model: the run's save_pretrained folder


def output_dir_problem(output_dir: Path) -> str | None:
    """Why `output_dir` cannot be made or written in (a file where a folder must be, no permission,
    a read-only file system), or None; found with the configuration's problems, nothing created."""
    existing = output_dir.absolute()
    while not existing.exists():  # the nearest folder there is: where the first mkdir writes
        existing = existing.parent
    if not existing.is_dir():
        return f"--output_dir {output_dir}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output_dir {output_dir}: {existing} cannot be written in (no permission, or a read-only file system)"
    return None


def prepare_output_dir(output_dir: Path, *, clear: bool, resume: Path | None, rank: int) -> list[Path]:
    """The output dir, claimed by this run, its old checkpoints removed when `clear`, checked to be
    shared by every rank. The checkpoints a resumed run does not continue are set aside in
    OUTPUT/abandoned/TIME/ with the metrics logged past its step (which metrics.jsonl drops), the
    export and the final eval's files, and returned (on rank 0)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    problems = claim_output_dir(output_dir, rank=rank)
    agree(problems)
    if problems:
        raise ConfigError(problems)
    if clear and rank == 0:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    moved = _set_aside_the_line_left(output_dir, resume=resume) if resume is not None and rank == 0 else []
    dist.barrier()
    _check_shared(output_dir, rank=rank)
    return moved


def _set_aside_the_line_left(output_dir: Path, *, resume: Path) -> list[Path]:
    """Moves the checkpoints that a run resuming from `resume` does not continue (set_aside), the
    metrics logged past its step, the export and the final eval's files to OUTPUT/abandoned/TIME/;
    returns the checkpoints moved."""
    into = output_dir / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
    if moved := set_aside(output_dir / "checkpoints", resume=resume, into=into):
        past = split_log(output_dir / "metrics.jsonl", at=checkpoint_info(resume)["step"])[1]
        (into / "metrics.jsonl").write_text("".join(line + "\n" for line in past))
        for name in (MODEL_EXPORT, RESULTS_FILE, PREDICTIONS_FILE, CONFUSION_FILE):
            if (output_dir / name).exists():
                (output_dir / name).rename(into / name)
        print(f"train: moved {len(moved)} checkpoint(s) this run does not continue ({', '.join(p.name for p in moved)}"
              f"; it goes on from {resume}), their metrics and export to {into}", flush=True)
    return moved


CLAIMS: dict[Path, int] = {}  # output dir -> the file descriptor of its lock, held until the process ends


def claim_output_dir(output_dir: Path, *, rank: int) -> list[str]:
    """Rank 0 takes the output dir's lock (flock on OUTPUT/.run.lock, released when the process ends,
    however it ends); a problem naming the run that holds it. Two runs in one output dir (the same
    command started twice) would write each other's checkpoints and metrics, and --overwrite_output_dir
    would delete the other's. A file system without locks is not checked."""
    if rank != 0 or output_dir.resolve() in CLAIMS:
        return []
    try:
        fd = os.open(output_dir / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return [f"--output_dir {output_dir}: cannot write in it ({e.strerror})"]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        return [f"--output_dir {output_dir} is in use by another run ({holder}): wait for it to end, or pick "
                f"another --output_dir"]
    except OSError:  # no locks on this file system
        os.close(fd)
        return []
    os.ftruncate(fd, 0)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    os.pwrite(fd, holder.encode(), 0)
    CLAIMS[output_dir.resolve()] = fd
    return []


def _check_shared(output_dir: Path, *, rank: int) -> None:
    """Every rank sees what rank 0 writes in the output dir (checkpoints need a file system that
    every node shares), else a ConfigError naming the ranks that do not."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = output_dir / f".shared-{token[0]}"
    if rank == 0:
        probe.touch()
    dist.barrier()
    blind = [] if probe.exists() else [f"rank {rank} ({socket.gethostname()})"]
    agree(blind)
    dist.barrier()
    if rank == 0:
        probe.unlink()
    if blind:
        raise ConfigError([f"--output_dir {output_dir}: {', '.join(blind)} do not see the files rank 0 writes there; "
                           f"checkpoints need a folder every node shares (NFS, Lustre, ...)"])


def agreed_resume(args: TrainArgs, output_dir: Path, *, rank: int) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, chosen by rank 0 and sent to every rank: on a shared file
    system another node may see a stale listing (NFS attribute caching), and ranks that resumed
    from different steps would train on silently."""
    choice: list = [None]
    if rank == 0:
        resume, problems = None, []
        try:
            resume, partial = find_resume(args.resume, output_dir / "checkpoints")
            if partial:
                print(f"train: ignoring {len(partial)} incomplete checkpoint(s) (interrupted saves): "
                      f"{', '.join(p.name for p in partial)}")
        except CheckpointError as e:
            problems.append(str(e))
        if args.resume is None and not args.overwrite_output_dir and complete_checkpoints(output_dir / "checkpoints")[0]:
            problems.append(f"{output_dir} holds checkpoints of an earlier run: --resume auto continues it, "
                            f"--overwrite_output_dir starts over, or pick another --output_dir")
        choice = [(resume, problems)]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]
