"""Train a Hugging Face image classifier with DeepSpeed on DALI-fed WebDataset shards.

    deepspeed train/main.py --ds_config ds_configs/zero2.json [--data OUT] [--model NAME_OR_DIR] ...

`setup` resolves and checks everything (data, model, processor, DeepSpeed config, batch
arithmetic, output dir, checkpoint to resume) and raises one ConfigError listing every problem
before any work starts. `fit` is the loop: `train_step`, with logging, eval and checkpointing as
hooks around it. Everything a run writes goes under --output_dir (claimed and checked in
train/output_dir.py); the ranks' process group, agreement and signals are train/distributed.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's packages, not train/'s modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def _stopped_while_loading(signum, frame) -> None:
    """Ctrl-C while the libraries load (seconds, before main's handlers): one line, not each
    rank's KeyboardInterrupt traceback from deep inside an import."""
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0":
        print("\ntrain: stopped by Ctrl-C while loading its libraries; nothing was done", file=sys.stderr, flush=True)
    raise SystemExit(130)


if __name__ == "__main__":
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where the job ignores it)
        signal.signal(signal.SIGINT, _stopped_while_loading)

import contextlib
import dataclasses
import faulthandler
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field

import deepspeed
import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.profiler import record_function
from tqdm import tqdm

from pipelines.dali import Decoding
from pipelines.loader import DataError, PipelineError, create_loader
from pipelines.shards import ShardFormatError, load_classes, load_manifest
from pipelines.spec import ProcessorError, processor_at_size, spec_from_processor
from train.args import ConfigError, TrainArgs, out_of_range, parse_args, training_only_given
from train.augment import erase_batch, mix_batch
from train.checkpoint import (EMA_FILE, FROZEN_FILE, MODEL_FILES, CheckpointError, WriteError, any_damage,
                              checkpoint_info, checkpoint_path, complete_checkpoints, drop_universal, export_model,
                              folder_bytes, load_checkpoint, record_top1, save_checkpoint, save_frozen,
                              share_unreadable, universal_checkpoint, universal_gaps, write_failure)
from train.config import (find_autos, load_ds_config, resolve_batch, resolve_optimizer, resolve_precision,
                          resolve_schedule)
from train.data import BaselineLoader, SyntheticLoader, builtin_digits
from train.distributed import (LOOP_SAVES, Interrupted, PeerWatch, Terminated, agree, cpu_share, deepspeed_runner,
                               distributed, exit_rank, few_cores, hold_sigterm, lost_peer, watch_sigterm)
from train.ema import WeightAverage
from train.evaluation import (CONFUSION_FILE, PREDICTIONS_FILE, RESULTS_FILE, PredictionWriter, describe,
                              join_predictions, summarize, write_report)
from train.metrics import RunLogger, default_wandb_mode, split_log, teardown_wandb, truncate_log, viewable
from train.model import (BUILTIN_MODEL, build_model, builtin_processor, by_id_pairs, cast_parameters, load_trained,
                         freeze_backbone, layer_stages, model_at_size, model_labels, model_source, parameter_groups,
                         prepare_precision, size_bound)
from train.output_dir import MODEL_EXPORT, agreed_resume, claim_output_dir, output_dir_problem, prepare_output_dir
from train.perf import (clear_stale_build_locks, cpu_info_once, deepspeed_arch_list, defer_muon_compile,
                        fused_adam_is_built, peak_tflops, train_flops_per_image)
from train.resume import (data_order, loader_state, read_trainer_state, recipe_changes, restart_hint,
                          training_recipe)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The built-in default's recipe, for arguments left at their defaults: digits are small, grey and
# not mirror-symmetric
BUILTIN_RECIPE = {"epochs": 4.0, "hflip": 0.0, "crop_scale": (0.6, 1.0), "lr": 2e-3}


@dataclass
class Run:
    """Everything setup resolved; `fit` reads it and advances `step`."""

    args: TrainArgs
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str
    data: Path
    classes: list[str]
    spec: object
    processor: object
    engine: object
    train_loader: object
    eval_loader: object | None
    output_dir: Path
    total_steps: int
    steps_per_epoch: int
    eval_steps: int
    save_steps: int
    logger: RunLogger
    ds_config: dict
    order: dict = field(default_factory=dict)  # data_order: checked when a run resumes
    recipe: dict = field(default_factory=dict)  # training_recipe: compared when a run resumes
    eval_offset: int = 0  # evals fall at steps = eval_offset modulo eval_steps (by default where epochs end)
    save_offset: int = 0
    step: int = 0  # optimizer steps done
    doing: int = 0  # the step under way (its train step, then its hooks), for messages
    best: dict = field(default_factory=lambda: {"top1": None, "step": None})
    mix_rng: np.random.Generator | None = None
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    bad_steps: int = 0  # of them, consecutive up to now
    unchecked: torch.Tensor | None = None  # --nan_guard stop: non-finite micro-batch losses not yet checked
    checked_step: int = 0  # --nan_guard stop: the last step whose losses were checked
    last_eval: dict = field(default_factory=dict)
    last_saved: Path | None = None  # the newest complete checkpoint of this run (or the one resumed)
    ema: WeightAverage | None = None  # --ema_decay: the weight average
    flops_per_image: float = 0.0  # of a forward and backward pass (perf/tflops)
    peak_tflops: float | None = None  # of the device, for perf/mfu

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"


def main(argv: list[str] | None = None) -> int:
    for key in [k for k, v in os.environ.items() if v == "" and k.startswith(("WANDB_", "DDV_", "TRAIN_", "DS_"))]:
        del os.environ[key]  # an empty variable means unset (wandb.init fails on WANDB_MODE="")
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung rank: `kill -USR1 PID` prints its stacks
    watch_sigterm()
    removed, named = clear_stale_build_locks()  # every rank, before any op loads
    for line in removed + (named if os.environ.get("LOCAL_RANK", "0") == "0" else []):
        print(f"train: {line}", file=sys.stderr, flush=True)
    try:
        with distributed():
            return run_training(args)
    except Terminated as e:
        print(f"train: rank {os.environ.get('RANK', 0)}: stopped by {e.how} outside the training loop; nothing "
              f"was saved", file=sys.stderr, flush=True)
        teardown_wandb()  # a run begun in setup
        return 128 + e.signum
    finally:  # the way out is done: exit's own cleanup is not interrupted, and the launcher's SIGTERM (to
        # every rank once one has exited) no longer decides how this rank ends: killed by it, a rank on its
        # way out after a peer's death passed for the cause in the others' message (the watcher still ends
        # a rank that has not exited SIGTERM_GRACE_S after it)
        hold_sigterm()
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_training(args: TrainArgs) -> int:
    """setup and fit (with --eval_only: setup_eval and evaluate_only), and the exit code: 0 done,
    2 configuration, 3 data, 4 non-finite losses or weights, 5 the input pipeline failed without a
    bad sample to blame, 6 a checkpoint, the export, the metrics or the eval results could not be
    written, 7 stopped on SIGTERM (preemption) or Ctrl-C with a checkpoint saved, 130 stopped by a
    second Ctrl-C without saving, 1 anything else (main: 143 or 130, SIGTERM or Ctrl-C outside the
    training loop)."""
    rank = dist.get_rank()
    _quiet_libraries(rank)
    peers = PeerWatch(rank, silent_s=max(args.peer_timeout, PeerWatch.LEAST_SILENT_S))  # (a smaller one: refused)
    peers.where = lambda: "in setup"
    prepare, work = (setup_eval, evaluate_only) if args.eval_only else (setup, fit)
    try:
        run = prepare(args)
    except (ConfigError, CheckpointError) as e:  # agreed by every rank: all stop together
        peers.close()
        if rank == 0:
            print(f"train: configuration error, nothing was trained:\n{e}", file=sys.stderr)
        return 2
    except BaseException as e:
        code = _failed(peers, e, rank=rank)
        peers.leave()
        if code is None:
            raise
        return code
    peers.where, peers.kept = (lambda: f"at step {run.doing}"), (lambda: _kept(run))
    try:
        result = work(run)
    except (NonFiniteLoss, CheckpointError) as e:  # agreed by every rank (a save refuses non-finite weights)
        peers.close()
        if rank == 0:
            print(f"train: stopped: {e}\ntrain: {_kept(run)}", file=sys.stderr)
        return 4
    except Preempted as e:  # agreed by every rank
        peers.close()
        if rank == 0:
            print(f"train: stopped: {e}", file=sys.stderr, flush=True)
        return 7
    except Interrupted:  # every rank of the terminal's job has it; another node's is told
        if peers.stop_all(130, f"rank {rank} was stopped by Ctrl-C at step {run.doing}, without saving"):
            print(f"train: rank {rank}: stopped by a second Ctrl-C at step {run.doing}, without saving\n"
                  f"train: {_kept(run)}", file=sys.stderr, flush=True)
        return 130
    except WriteError as e:  # one rank or several: the first to fail speaks
        if peers.stop_all(6, f"rank {rank} could not write (its message says what)"):
            print(f"train: {e}", file=sys.stderr, flush=True)
        return 6
    except (DataError, PipelineError) as e:  # only the rank that read the batch knows: it stops the others
        code, what = (3, "data error") if isinstance(e, DataError) else (5, "input pipeline error")
        when = "during the eval" if args.eval_only else f"at step {run.doing}"
        print(f"train: rank {rank}: {what} {when}: {e}\ntrain: {_kept(run)}", file=sys.stderr, flush=True)
        peers.stop_all(code, f"rank {rank} had a {what} {when} (its message says which)")
        return code
    except BaseException as e:
        if (code := _failed(peers, e, rank=rank)) is None:
            raise
        return code
    finally:
        run.logger.finish()
        peers.leave()  # after a failure: once every rank is done
    peers.close()
    if rank == 0:
        print(result)
    dist.barrier()
    return 0


def _failed(peers: PeerWatch, error: BaseException, *, rank: int) -> int | None:
    """An unexpected error on this rank; None: the caller raises it (its traceback, exit 1). The
    first rank to fail tells the others (PeerWatch) and says what is left to go on from; a rank
    whose error came after another's failure (its collective lost that rank) stops with that
    rank's reason and code instead of a second traceback (and names a rank of its node found
    dead); so does the first when a rank of its node has died (killed outright: the error is the
    lost peer's). A rank whose collective lost a peer not of its node first gives that peer's node
    a moment to name it (PeerWatch.await_reason). SIGTERM or Ctrl-C outside the training loop
    (Terminated) go on as they are; after an error, SIGTERM no longer interrupts (hold_sigterm)."""
    if isinstance(error, Exception):
        hold_sigterm()
    where = peers.where()
    ended = peers.ended(where) if isinstance(error, Exception) else None
    if ended is None and lost_peer(error):
        peers.await_reason()  # the lost peer's node names it
    peers.stop_all(1, ended or (f"rank {rank} was {error} {where}" if isinstance(error, Terminated) else
                                f"rank {rank} failed {where}: {type(error).__name__}: {error}"))
    if not isinstance(error, Exception):
        return None
    if peers.first is not None or ended:
        return peers.say_stopping(ended or f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
    silent = ", ".join(f"rank {k}" for k in peers.silent())
    peers.say(f"failed {where} (the traceback follows)" + (
        f"; {silent} did not answer within {peers.ROLL_S:g} s: its process ended or hangs, on another node (killed by "
        f"the OOM killer? that node's log and `dmesg` say), and a lost peer fails a collective" if silent else ""),
        kept=True)
    return None


def _kept(run: Run) -> str:
    """What a run that failed leaves to go on from."""
    if run.args.eval_only:
        return "nothing was trained"
    if not run.save_steps:
        return "nothing was saved (--save_steps 0)"
    complete, _ = complete_checkpoints(run.checkpoints)
    if not complete:
        return f"no checkpoint was saved in {run.checkpoints} (--resume auto starts over)"
    return f"the newest complete checkpoint, {complete[-1]}, is intact (--resume auto goes on from it)"


# --- setup: everything checked before any work ------------------------------------------------

def setup(args: TrainArgs) -> Run:
    """Everything resolved and checked first (one ConfigError lists every problem, agreed by all
    ranks), then the output dir, the engine, the checkpoint resumed from and the logger."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problems = out_of_range(args)
    device = _device(local_rank, problems)
    if stream := compute_stream(device, high_priority=args.priority_stream):
        torch.cuda.set_stream(stream)  # before anything runs: the model, DeepSpeed and the batches' copies
    builtin = args.data is None
    if builtin:
        args = _with_recipe(args, BUILTIN_RECIPE)
    data, manifest, classes, eval_samples = _data(args, local_rank=local_rank, problems=problems)
    ds_config = resolve_batch(load_ds_config(args.ds_config, problems), args, world_size=world, problems=problems)
    precision = resolve_precision(ds_config, args, device_type=device.type, problems=problems)
    resolve_optimizer(ds_config, device_type=device.type)
    model, image_processor, head = _model(args, builtin=builtin, classes=classes, problems=problems)
    model, image_processor, spec, resampled = _at_image_size(args, model, image_processor, problems)
    frozen = freeze_backbone(model) if args.freeze_backbone and model is not None else 0

    output_dir = Path(args.output_dir or Path("outputs") / f"{data.name}-{_model_name(args, model)}")
    order = data_order(args, ds_config, manifest)
    if unusable := output_dir_problem(output_dir):
        problems.append(unusable)
        resume, trainer_state = None, {}
    else:
        resume, trainer_state = _resume_point(args, output_dir, rank=rank, world=world, classes=classes, order=order,
                                              problems=problems)
    train_loader = eval_loader = None
    if not problems:
        train_loader, eval_loader = create_loaders(args, data=data, spec=spec, ds_config=ds_config,
                                                   precision=precision, device=device, eval_samples=eval_samples,
                                                   state=loader_state(trainer_state, args, world=world, order=order),
                                                   problems=problems)
    # a stand-in loader's checkpoint has no position: its steps count from the start
    done = trainer_state["step"] if trainer_state.get("train_loader") else 0
    steps_per_epoch, epoch_offset, total_steps, warmup, schedule = _schedule(
        args, ds_config, train_loader=train_loader, data=data, done=done, problems=problems)
    recipe = training_recipe(args, ds_config, world_size=world, precision=precision, total_steps=total_steps,
                             warmup_steps=warmup, image_size=spec.output_size if spec else None)
    changes = recipe_changes(trainer_state, recipe, path=resume, problems=problems,
                             size_bound=bool(trainer_state) and model is not None and size_bound(model))
    problems += _flag_problems(args) + _layer_decay_problems(args, model, ds_config)
    agree(problems)
    if problems:
        raise ConfigError(problems)

    train_loader = _stand_in(args, train_loader, data=data, processor=image_processor, classes=classes,
                             ds_config=ds_config, precision=precision, device=device, rank=rank)
    moved = prepare_output_dir(output_dir, clear=args.overwrite_output_dir and resume is None, resume=resume,
                                rank=rank)
    if rank == 0:  # a frozen backbone before DeepSpeed casts it: what the export takes (a stale one removed)
        _keep_frozen(model if frozen and precision != "fp32" else None, output_dir / MODEL_FILES / FROZEN_FILE)
    flops, peak = _perf_figures(args, model, spec=spec, classes=classes, device=device, precision=precision)
    parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them (numel 0)
    other_ranks = bool(trainer_state) and trainer_state["ranks"] != world  # saved by them: a universal load
    engine = _engine(args, model, ds_config=ds_config, schedule=schedule, precision=precision, device=device,
                     rank=rank, universal=other_ranks)
    ema = _weight_average(args, engine, device=device)
    seed_streams(args.seed, rank=rank, step=0)
    eval_steps, eval_offset = (args.eval_steps, 0) if args.eval_steps else (steps_per_epoch, epoch_offset)
    save_steps, save_offset = (eval_steps, eval_offset) if args.save_steps is None else (args.save_steps, 0)  # 0: never
    run = Run(args=args, rank=rank, world_size=world, local_rank=local_rank, device=device, precision=precision,
              data=data, classes=classes, spec=spec, processor=image_processor, engine=engine,
              train_loader=train_loader, eval_loader=eval_loader, output_dir=output_dir, total_steps=total_steps,
              steps_per_epoch=steps_per_epoch, eval_steps=eval_steps, save_steps=save_steps, ds_config=ds_config,
              order=order, recipe=recipe, logger=None, eval_offset=eval_offset, save_offset=save_offset,
              mix_rng=np.random.default_rng(args.seed + 7919 * rank), ema=ema, flops_per_image=flops,
              peak_tflops=peak)
    run_config = _record_run(run, model=model, parameters=parameters, frozen=frozen, head=head, resampled=resampled,
                             train_samples=manifest["splits"]["train"]["samples"], eval_samples=eval_samples)
    _begin(run, run_config, resume=resume, state=trainer_state, other_ranks=other_ranks, changes=changes,
           branched=bool(moved or changes))
    return run


def _keep_frozen(model, path: Path) -> None:
    """A frozen backbone's weights as loaded (fp32), for the export: DeepSpeed holds them in bf16 or
    fp16, and they do not train (no fp32 copy in the optimizer). Without `model`, none is kept."""
    if model is None:
        path.unlink(missing_ok=True)
        return
    try:
        save_frozen({name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}, path)
    except OSError as e:
        raise WriteError(f"writing {path} failed: {write_failure(e)}") from e


def _begin(run: Run, config: dict, *, resume: Path | None, state: dict, other_ranks: bool, changes: list[str],
           branched: bool) -> None:
    """The run at the checkpoint it resumes from (if any), its sample-key logs cut there, its W&B
    run opened (the line it continues, or a new one when `branched`), and the banner printed."""
    if resume is not None:
        _resume(run, resume, state, other_ranks=other_ranks)
    if run.args.record_keys:
        folder = _keys_log(run).parent
        folder.mkdir(exist_ok=True)
        # rank 0 also cuts the logs of ranks this run does not have (an earlier line ran on more)
        others = ([p for p in folder.glob("rank*.jsonl") if int(p.stem[4:]) >= dist.get_world_size()]
                  if run.rank == 0 else [])
        for log in [_keys_log(run), *others]:
            truncate_log(log, after=run.step)
    wandb = _open_logger(run, config, resume_step=run.step if resume else None,
                         **_wandb_line(run, state, resume=resume, branched=branched))
    if run.best["top1"] is not None:  # a new line's W&B run (branched) has none until its first eval
        _summarize_best(run)
    if run.rank == 0:
        print(_banner(run, config, resumed=resume, changes=changes, wandb=wandb))


def _resume_point(args: TrainArgs, output_dir: Path, *, rank: int, world: int, classes: list[str], order: dict,
                  problems: list[str]) -> tuple[Path | None, dict]:
    """The checkpoint this run resumes from, agreed by every rank, and this rank's trainer state in
    it (None and {} for a fresh run); the output dir is claimed before anything in it is read, and
    the checkpoint's files are checked before any is loaded (rank 0: all there, as saved; each rank:
    the checksums of its share)."""
    problems += claim_output_dir(output_dir, rank=rank) if output_dir.is_dir() else []
    resume, resume_problems = agreed_resume(args, output_dir, rank=rank)
    problems += resume_problems
    if resume is None:
        return None, {}
    damaged = [why] if (why := share_unreadable(resume, rank=rank, world=world)) else []
    agree(damaged)  # before any rank loads a file another rank found changed
    if damaged:
        problems += damaged
        return resume, {}
    return resume, read_trainer_state(resume, rank=rank, world=world, classes=classes, order=order, problems=problems)


def _record_run(run: Run, *, model, parameters: int, frozen: int, head: str | None, resampled: str | None,
                train_samples: int, eval_samples: int) -> dict:
    """The run's resolved configuration (run_config.json, and W&B's config); rank 0 writes it, and
    the model config and processor to OUTPUT/model_files, which turn any checkpoint into a model
    folder (tools/export_checkpoint.py)."""
    config = {"args": asdict(run.args), "deepspeed": run.ds_config, "preprocess": asdict(run.spec),
              "precision": run.precision, "world_size": run.world_size, "device": run.device.type,
              "data": str(run.data), "classes": len(run.classes), "train_samples": train_samples,
              "val_samples": eval_samples, "eval_split": run.args.eval_split,
              "parameters": parameters, "frozen_parameters": frozen, "head": head, "resampled": resampled,
              "train_flops_per_image": run.flops_per_image,
              "peak_tflops": run.peak_tflops}
    if run.rank == 0:
        (run.output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        model.config.save_pretrained(run.output_dir / MODEL_FILES)
        run.processor.save_pretrained(run.output_dir / MODEL_FILES)
    return config


def _banner(run: Run, config: dict, *, resumed: Path | None, changes: list[str], wandb: str) -> str:
    ds, args = run.ds_config, run.args
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    return (f"train: {run.world_size} rank(s) on {run.device.type}, {run.precision}, ZeRO-{zero}; {run.data}: "
            f"{config['train_samples']} train / {config['val_samples']} {args.eval_split} images, "
            f"{len(run.classes)} classes; {type(run.engine.module).__name__} ({config['parameters'] / 1e6:.2f}M "
            f"parameters)\n"
            + (f"train: classifier head: {config['head']}\n" if config["head"] else "")
            + (f"train: {config['resampled']}\n" if config["resampled"] else "")
            + (f"train: backbone frozen ({config['frozen_parameters'] / 1e6:.2f}M parameters): the head's "
               f"{config['parameters'] - config['frozen_parameters']:,} train\n" if config["frozen_parameters"] else "")
            + _layer_decay_line(run) + _warmup_line(run)
            + (f"train: warning: {starved}\n" if (starved := few_cores(run.device.type)) else "")
            + (f"train: weight average (EMA), decay {args.ema_decay:g}: evals and the export use it (eval/); the "
               f"trained weights' evals are eval_no_ema/\n" if run.ema is not None else "")
            + (f"train: no {args.eval_split} images in {run.data}: nothing is evaluated"
               + (", and the export is the last checkpoint" if run.save_steps else "") + "\n"
               if not config["val_samples"] else "")
            + f"train: {run.total_steps} steps ({run.steps_per_epoch} per epoch) of {ds['train_batch_size']} images "
            f"= {ds['train_micro_batch_size_per_gpu']} micro x {ds['gradient_accumulation_steps']} accumulation x "
            f"{run.world_size} ranks\n"
            f"train: output in {run.output_dir}; {wandb}"
            + (f"\ntrain: resuming from {resumed} (step {run.step})" if resumed else "")
            + (f"\ntrain: this run's settings apply from step {run.step + 1}: {'; '.join(changes)}" if changes else ""))


def _warmup_line(run: Run) -> str:
    """A warmup as long as the run or longer (a smoke test's --max_steps with a long run's warmup, or
    fewer epochs than before): the learning rate never reaches its peak, nor decays."""
    warmup, lr = run.recipe["warmup_steps"], run.recipe["lr"]
    if not warmup or warmup < run.total_steps or lr is None or "scheduler" in run.ds_config:
        return ""
    return (f"train: warning: the warmup ({warmup} steps) is as long as the run ({run.total_steps}) or longer: the "
            f"learning rate rises to {lr * (run.total_steps - 1) / warmup:.3g} at most, never to {lr:g} "
            f"(--warmup_steps)\n")


def _layer_decay_line(run: Run) -> str:
    if run.args.layer_decay == 1.0:
        return ""
    stages = layer_stages(run.engine.module)
    decay, layers = run.args.layer_decay, sum(len(stage) for _, stage in stages)
    unit, first = ("layers", "the embeddings") if len(stages) == 1 else ("blocks", "the stem")
    return (f"train: layer decay {decay:g}: the head at the learning rate, {unit} 1 to {layers} at "
            f"x {decay ** layers:.3g} to x {decay:g} of it, {first} at x {decay ** (layers + 1):.3g}\n")


def _stand_in(args: TrainArgs, train_loader, *, data: Path, processor, classes: list[str], ds_config: dict,
              precision: str, device: torch.device, rank: int):
    """The train loader, or what --synthetic_data or --baseline_loader puts in its place."""
    if args.synthetic_data:
        return SyntheticLoader(train_loader, num_classes=len(classes), seed=args.seed + rank)
    if args.baseline_loader:
        return BaselineLoader(train_loader, data=data, processor=processor,
                              batch_size=ds_config["train_micro_batch_size_per_gpu"], workers=cpu_share(),
                              seed=args.seed + rank, device=device, dtype=DTYPES[precision],
                              channels_last=args.channels_last)
    return train_loader


def _wandb_line(run: Run, trainer_state: dict, *, resume: Path | None, branched: bool) -> dict:
    """The W&B run to log to (id None: a new one) and its name. One W&B run per line of training: a
    resumed run continues the checkpoint's W&B run, unless the checkpoint is another output dir's,
    or this run leaves the line that W&B logged past the checkpoint's step (it went back to an
    earlier checkpoint, or changed settings): W&B would draw both lines' values at those steps."""
    name = run.args.wandb_run_name or trainer_state.get("wandb_run_name") or run.output_dir.name
    if resume is None:
        return {"run_id": None, "name": name}
    elsewhere = resume.resolve().parent != run.checkpoints.resolve()
    logged_past = run.rank == 0 and bool(split_log(run.output_dir / "metrics.jsonl", at=run.step)[1])
    if elsewhere or branched and logged_past:
        return {"run_id": None, "name": run.args.wandb_run_name or f"{run.output_dir.name} from step {run.step}"}
    return {"run_id": trainer_state.get("wandb_run_id"), "name": name}


def _open_logger(run: Run, config: dict, *, run_id: str | None, name: str, resume_step: int | None) -> str:
    """Sets run.logger (metrics.jsonl, and W&B on rank 0); returns the W&B mode and why, for the banner."""
    args = run.args
    mode, why = (args.wandb_mode, "--wandb_mode") if args.wandb_mode else default_wandb_mode()
    run.logger = RunLogger(output_dir=run.output_dir, enabled=run.rank == 0, mode=mode, project=args.wandb_project,
                           name=name, config=config, run_id=run_id, resume_step=resume_step)
    if run.logger.fallback:
        return f"W&B offline: {mode} failed ({run.logger.fallback}); `wandb sync DIR` uploads it later"
    relogged = run.logger.relogged
    return f"W&B {mode} ({why})" + (
        f"; logged again: {len(relogged)} row(s) of steps {relogged[0]}-{relogged[-1]} that its stopped part had "
        f"not written" if relogged else "")


def setup_eval(args: TrainArgs) -> Run:
    """--eval_only: the trained model as it is (labels checked against classes.json), the eval
    split's loader, no optimizer and no checkpoints; a ConfigError lists every problem first."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problems = out_of_range(args, training=False)
    device = _device(local_rank, problems)
    if not args.model or args.model_config:
        problems.append("--eval_only evaluates a trained model: pass --model DIR (a training run's OUTPUT/model, or "
                        "any save_pretrained folder or hub name), and no --model_config")
    data, manifest, classes, eval_samples = _data(args, local_rank=local_rank, problems=problems)
    if manifest is not None and not eval_samples:
        problems.append(f"--eval_only: {data} has no {args.eval_split} samples")
    ds_config = resolve_batch(load_ds_config(args.ds_config, problems), args, world_size=world, problems=problems,
                              training=False)
    precision = resolve_precision(ds_config, args, device_type=device.type, problems=problems)
    model = image_processor = eval_loader = None
    if args.model and not args.model_config and classes:
        model, image_processor = load_trained(model=args.model, processor=args.processor, classes=classes,
                                              problems=problems, by_id=args.labels_by_id)
    model, image_processor, spec, resampled = _at_image_size(args, model, image_processor, problems)
    if not problems:
        _, eval_loader = create_loaders(args, data=data, spec=spec, ds_config=ds_config,
                                        precision=precision, device=device, eval_samples=eval_samples, state=None,
                                        problems=problems, train=False)
    output_dir = Path(args.output_dir or Path("outputs") / f"eval-{data.name}-{_model_name(args, model)}-{args.eval_split}")
    problems += [unusable] if (unusable := output_dir_problem(output_dir)) else []
    agree(problems)
    if problems:
        raise ConfigError(problems)

    prepare_output_dir(output_dir, clear=False, resume=None, rank=rank)
    prepare_precision(model, DTYPES[precision])
    cast_parameters(model, DTYPES[precision])  # as DeepSpeed's engine would: the same logits as training's evals
    model.to(device).eval()
    run_config = {"args": asdict(args), "preprocess": asdict(spec), "precision": precision, "world_size": world,
                  "device": device.type, "data": str(data), "classes": len(classes), "eval_split": args.eval_split,
                  "eval_samples": eval_samples, "resampled": resampled}
    run = Run(args=args, rank=rank, world_size=world, local_rank=local_rank, device=device, precision=precision,
              data=data, classes=classes, spec=spec, processor=image_processor, engine=model, train_loader=None,
              eval_loader=eval_loader, output_dir=output_dir, total_steps=0, steps_per_epoch=0, eval_steps=0,
              save_steps=0, ds_config=ds_config, logger=None)
    wandb = _open_logger(run, run_config, resume_step=None, **_wandb_line(run, {}, resume=None, branched=False))
    if rank == 0:
        labels = model_labels(model.config)
        print(f"train: evaluating {args.model} ({type(model).__name__}, {precision}) on {eval_samples} "
              f"{args.eval_split} images of {data}, {world} rank(s) on {device.type}; {wandb}"
              + (f"\ntrain: labels by id: {by_id_pairs(labels, classes)}" if labels != classes else "")
              + (f"\ntrain: {resampled}" if resampled else "") + _unused_by_eval(args))
    return run


def _unused_by_eval(args: TrainArgs) -> str:
    """A line naming the training flags an --eval_only command line holds (they change nothing)."""
    if not (unused := training_only_given(args)):
        return ""
    average = (" (a run trained with --ema_decay exported its weight average: --model holds it already)"
               if "--ema_decay" in unused else "")
    return f"\ntrain: not used by --eval_only (training only): {' '.join(unused)}{average}"


def evaluate_only(run: Run) -> str:
    """--eval_only's work: one eval with every detail; returns the summary printed at the end."""
    result = evaluate(run, details=True)
    report = result["_report"]
    log_eval(run, result)
    if run.rank != 0:
        return ""
    files = "\n".join(f"  {name + ':':<17} {path}" for name, path in report.paths.items())
    return "\n".join(["train: eval done: " + describe(report.results)[0], *("  " + line for line in
                                                                           describe(report.results)[1:]), files])


def _device(local_rank: int, problems: list[str]) -> torch.device:
    """This rank's device (DeepSpeed's accelerator: the node's device numbered LOCAL_RANK); CPU
    ranks on one machine share its cores."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        torch.set_num_threads(cpu_share())
        return torch.device("cpu")
    if problem := unseen_device(local_rank, accelerator.device_count()):
        problems.append(problem)
        local_rank = 0  # (stops at the problems, agreed)
    device = torch.device(accelerator.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def unseen_device(local_rank: int, count: int) -> str | None:
    """Why a rank cannot take the node's device numbered by its LOCAL_RANK (as DeepSpeed does), or
    None: a scheduler gave each process a device of its own (srun --gpus-per-task)."""
    if local_rank < count:
        return None
    return (f"rank {os.environ.get('RANK', 0)} is rank {local_rank} of its node but sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): every rank of a node must see "
            f"all of the node's GPUs; under srun, give the step each node's GPUs (--gpus-per-node N, not "
            f"--gpus-per-task; or --gpu-bind=none)")


def compute_stream(device: torch.device, *, high_priority: bool):
    """--priority_stream: a CUDA stream of the device's highest priority for the model (DALI's
    stream keeps the default), or None (the default stream; always on CPU)."""
    if device.type != "cuda" or not high_priority:
        return None
    return torch.cuda.Stream(device, priority=-100)  # torch maps it to the highest priority there is


def _data(args: TrainArgs, *, local_rank: int, problems: list[str]) -> tuple[Path, dict | None, list[str], int]:
    """(the shard folder, its manifest, the class names, the samples of the eval split)."""
    data = builtin_digits(local_rank=local_rank) if args.data is None else Path(args.data)
    try:
        manifest, classes = load_manifest(data), load_classes(data)
    except ShardFormatError as e:
        problems.append(f"--data: {e}")
        return data, None, [], 0
    trained = [name for name, n in manifest["splits"]["train"]["per_class"].items() if n]
    if len(classes) < 2 or (len(trained) < 2 and not args.eval_only):
        problems.append(f"--data {data}: " + (f"its classes are {classes}" if len(classes) < 2 else
                                               f"its train images are all of one class, {trained[0]!r}" if trained else
                                               "it has no train images") +
                        ": a classifier needs two classes or more (a source folder of one class folder holding the "
                        "classes? shard that folder)")
    eval_samples = manifest["splits"].get(args.eval_split, {}).get("samples", 0)
    if not eval_samples and "eval_split" in args.given:
        problems.append(f"--eval_split {args.eval_split}: {data} has no {args.eval_split} samples "
                        f"(make_shards writes test/ from a test/ folder of the source)")
    return data, manifest, classes, eval_samples


def _flag_problems(args: TrainArgs) -> list[str]:
    """What is wrong with flags that nothing else checks."""
    problems = []
    if args.profile and not re.fullmatch(r"\d+:[1-9]\d*", args.profile):
        problems.append(f"--profile {args.profile}: expected START:STEPS, e.g. 20:10 (steps 21 to 30)")
    if args.synthetic_data and args.baseline_loader:
        problems.append("--synthetic_data and --baseline_loader are two stand-ins for the DALI loader; pass one")
    if args.crop_scale[0] > args.crop_scale[1]:
        problems.append(f"--crop_scale {args.crop_scale[0]:g} {args.crop_scale[1]:g}: the smaller area first")
    if args.peer_timeout < PeerWatch.LEAST_SILENT_S:
        problems.append(f"--peer_timeout {args.peer_timeout:g}: {PeerWatch.LEAST_SILENT_S:g} s or more (a busy machine "
                        f"may pause a process for seconds)")
    if args.labels_by_id and not args.model:
        problems.append("--labels_by_id maps a pretrained --model's labels to the classes; there is no --model")
    if args.freeze_backbone and not args.model:
        problems.append("--freeze_backbone trains a pretrained --model's head on its features; there is no --model")
    if args.drop_path and args.freeze_backbone:
        problems.append("--drop_path with --freeze_backbone: the frozen backbone runs as in eval, without stochastic "
                        "depth; drop one")
    if args.eval_split == "test" and args.export == "best" and "export" not in args.given and not args.eval_only:
        problems.append("--eval_split test: the export would be the checkpoint with the best test top-1, so the test "
                        "set would choose the model it then measures; evaluate on val while training and the export "
                        "on test (--eval_only --eval_split test), or pass --export last (or --export best to choose "
                        "by it all the same)")
    if args.layer_decay != 1.0 and args.freeze_backbone:
        problems.append("--layer_decay with --freeze_backbone: only the head trains, at --lr; drop one")
    return problems


def _layer_decay_problems(args: TrainArgs, model, ds_config: dict) -> list[str]:
    """What stands in the way of --layer_decay (its range checked with every flag's): a model without
    a stack of layers (`layer_stages`), or a DeepSpeed scheduler (it sets one rate for every
    parameter group)."""
    if args.layer_decay == 1.0:
        return []
    problems = []
    if model is not None and layer_stages(model) is None:
        problems.append(f"--layer_decay: {type(model).__name__} has no stack of layers to count depth in (ViT, "
                        f"DeiT, BEiT, DINOv2, the CLIP and SigLIP vision models, Swin, ConvNeXt, ResNet and RegNet "
                        f"have one); drop it")
    if "scheduler" in ds_config:
        problems.append(f"--layer_decay: {args.ds_config} has a scheduler section, and DeepSpeed's schedulers set "
                        f"one learning rate for every layer; remove it (--lr_scheduler then schedules)")
    return problems


def _model(args: TrainArgs, *, builtin: bool, classes: list[str], problems: list[str]):
    """(model, image processor, what became of a pretrained head), each None where a problem was
    found (the head's: or where there is no pretrained head)."""
    model_config, processor = args.model_config, args.processor
    if not args.model and not model_config:
        if builtin:
            model_config, processor = BUILTIN_MODEL, processor or builtin_processor()
        else:
            problems.append("no model: pass --model NAME_OR_DIR (pretrained) or --model_config JSON (random init)")
    model = image_processor = head = None
    if classes and (args.model or model_config):
        torch.manual_seed(args.seed)  # the same initial weights on every rank (ZeRO-3 partitions each rank's copy)
        model, image_processor, head = build_model(model=args.model, model_config=model_config, processor=processor,
                                                   classes=classes, problems=problems, by_id=args.labels_by_id,
                                                   drop_path=args.drop_path)
    elif args.model or args.model_config:  # no classes to size a head for: still report a bad model
        model_source(model=args.model, model_config=args.model_config, problems=problems)
    if args.gradient_checkpointing and model is not None and not model.supports_gradient_checkpointing:
        problems.append(f"--gradient_checkpointing: {type(model).__name__} does not support it")
    return model, image_processor, head


def _at_image_size(args: TrainArgs, model, image_processor, problems: list[str]):
    """(model, image processor, preprocessing spec, what was resampled): the processor at
    --image_size, the model fitted to the processor's images (model_at_size); None where a problem
    was found."""
    if args.image_size is not None and args.image_size < 1:
        problems.append(f"--image_size {args.image_size}: a side of 1 pixel or more")
        image_processor = None
    elif image_processor is not None and args.image_size:
        try:
            image_processor = processor_at_size(image_processor, args.image_size)
        except ProcessorError as e:
            problems.append(f"--image_size {args.image_size}: {e}")
            image_processor = None
    spec, resampled = _spec(image_processor, problems), None
    if model is not None and spec is not None:
        try:
            model, resampled = model_at_size(model, spec.output_size)
        except ValueError as e:
            height, width = spec.output_size
            problems.append(f"{type(model).__name__} cannot take {height}x{width} images ({spec.processor}'s"
                            + (f" at --image_size {args.image_size}" if args.image_size else "") + f"): {e}")
    return model, image_processor, spec, resampled


def _spec(image_processor, problems: list[str]):
    """The DALI preprocessing of the image processor, or None (and the problem noted)."""
    if image_processor is None:
        return None
    try:
        return spec_from_processor(image_processor)
    except ProcessorError as e:
        problems.append(f"image processor: {e}")
        return None


def create_loaders(args: TrainArgs, *, data: Path, spec, ds_config: dict, precision: str, device: torch.device,
                   eval_samples: int, state: dict | None, problems: list[str], train: bool = True):
    """The DALI loaders of `args`: (train loader or None when not `train`, eval loader or None when
    no `eval_samples`), or (None, None) with the problem noted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = ds_config["train_micro_batch_size_per_gpu"]
    common = dict(data=data, spec=spec, rank=rank, world_size=world, device=device, seed=args.seed,
                  dtype=DTYPES[precision], channels_last=args.channels_last,
                  num_threads=args.data_threads or _data_threads(device),
                  verify_hashes=not args.skip_shard_hashes)
    augment = {"scale": tuple(args.crop_scale), "hflip": args.hflip, "color_jitter": args.color_jitter,
               "auto_augment": args.auto_augment}
    try:
        train_loader = eval_loader = None
        if train:
            train_loader = create_loader(split="train", batch_size=micro, train=True, augment=augment, state=state,
                                         decoding=decoding_of(args, train=True), **common)
        if eval_samples:
            eval_loader = create_loader(split=args.eval_split, batch_size=args.eval_batch_size or micro, train=False,
                                        resize=args.eval_resize, decoding=decoding_of(args, train=False), **common)
    except (ShardFormatError, ValueError) as e:
        problems.append(f"--data {data}: {e}")
        return None, None
    return train_loader, eval_loader


def decoding_of(args: TrainArgs, *, train: bool) -> Decoding:
    """How the train or eval loader decodes on GPU: --hw_decoder_load; eval upsamples chroma as
    Pillow does, training only with --train_fancy_upsampling."""
    return Decoding(hw_decoder_load=args.hw_decoder_load, fancy_upsampling=args.train_fancy_upsampling if train else None)


def _schedule(args: TrainArgs, ds_config: dict, *, train_loader, data: Path, done: int, problems: list[str]):
    """(steps per epoch, the epochs' offset, total steps, warmup steps, the learning-rate schedule for
    deepspeed.initialize). `done`: the steps of the checkpoint that `train_loader` resumes from.
    --epochs counts from the loader's position, not as epochs x this run's steps per epoch: the steps
    done may have taken other samples (other ranks, micro batch or accumulation, in this run or an
    earlier one); then this run's epochs end at steps = the offset modulo steps per epoch, not 0."""
    if train_loader is None:  # another problem came first: the steps are known only when --max_steps says
        return 0, 0, args.max_steps or None, 0, None
    accum = ds_config["gradient_accumulation_steps"]
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        problems.append(f"one epoch of {data}/train is {len(train_loader)} micro batches per rank, fewer than "
                        f"--grad_accum {accum}; lower the micro batch or the accumulation")
    rest = (train_loader.source.steps_in(train_loader.epoch) - train_loader.step) // accum  # of the loader's epoch
    total_steps = args.max_steps or done + _steps_left(args.epochs, train_loader, rest=rest, accum=accum,
                                                       steps_per_epoch=steps_per_epoch)
    epoch_offset = (done + rest) % steps_per_epoch if steps_per_epoch else 0
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total_steps)
    schedule = resolve_schedule(ds_config, args, total_steps=total_steps, warmup_steps=warmup)
    if autos := find_autos(ds_config):
        problems.append(f"{args.ds_config}: nothing fills {', '.join(autos)} (\"auto\"); set values")
    return steps_per_epoch, epoch_offset, total_steps, warmup, schedule


def _steps_left(epochs: float, loader, *, rest: int, accum: int, steps_per_epoch: int) -> int:
    """The steps to `epochs` from where `loader` stands: the `rest` of its epoch, then whole epochs
    at this run's steps per epoch (a fresh loader: ceil(epochs x steps per epoch))."""
    if epochs >= loader.epoch + 1:
        return rest + math.ceil((epochs - loader.epoch - 1) * steps_per_epoch)
    # within the last epoch: its steps at this run's rate, less those its samples read so far took
    into = loader.batches_read() / accum
    return min(rest, max(0, math.ceil((epochs - loader.epoch) * steps_per_epoch - into)))


def _perf_figures(args: TrainArgs, model, *, spec, classes: list[str], device: torch.device,
                  precision: str) -> tuple[float, float | None]:
    """(train FLOPs per image, the device's dense peak TFLOP/s or None): perf/tflops and perf/mfu."""
    flops = train_flops_per_image(model, image_size=spec.output_size, num_classes=len(classes))
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    return flops, peak


def _engine(args: TrainArgs, model, *, ds_config: dict, schedule, precision: str, device: torch.device, rank: int,
            universal: bool):
    """The DeepSpeed engine around the model, in its precision, with gradient checkpointing;
    `universal`: to load a universal checkpoint (train/checkpoint.py: universal_checkpoint)."""
    if universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    prepare_precision(model, DTYPES[precision])
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cuda" and rank == 0 and not fused_adam_is_built():
        print("train: DeepSpeed is compiling its fused Adam for this GPU (once, about a minute; later runs reuse it "
              "from torch's extension cache)", flush=True)
    # DeepSpeed's builder cannot parse Hopper entries such as 9.0a; its CPU builders ask py-cpuinfo
    # (a new interpreter each time) on every load; its Muon kernels would import inductor
    defer_muon_compile()
    with deepspeed_arch_list(), cpu_info_once():
        groups = parameter_groups(model, lr=ds_config["optimizer"]["params"]["lr"], layer_decay=args.layer_decay)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config, lr_scheduler=schedule)
    if args.compile:
        engine.compile()
    return engine


def _weight_average(args: TrainArgs, engine, *, device: torch.device) -> WeightAverage | None:
    """--ema_decay: the average of the engine's weights, from its initial ones (a resume loads the
    checkpoint's: _resume)."""
    if not args.ema_decay:
        return None
    try:
        return WeightAverage(engine.module, decay=args.ema_decay, device=device)
    except ValueError as e:  # the DeepSpeed config's partitioning: the same on every rank
        raise ConfigError([str(e)]) from e


# --- fit: the loop -----------------------------------------------------------------------------

def fit(run: Run) -> str:
    """Trains to run.total_steps; returns the summary printed at the end."""
    engine = run.engine
    run.doing = run.step + 1
    engine.train()
    batches = step_batches(run.train_loader, accum=run.ds_config["gradient_accumulation_steps"])
    bar = tqdm(total=run.total_steps, initial=run.step, disable=run.rank != 0, unit="step", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    evaluate_missed(run)
    meter = new_meter()
    first_step, started = run.step, time.perf_counter()
    profiler, preemption = StepProfiler(run), Preemption(run)
    try:
        while run.step < run.total_steps:
            profiler.before_step()
            advance(run, batches, meter, bar)
            profiler.after_step()
            bar.update(1)
            if preemption.due():  # the same step on every rank
                if meter["steps"]:  # the steps since the last log: the resumed run's first row starts after them
                    log_train(run, meter, bar)
                preemption.stop()
    except Exception:
        preemption.failed = True
        raise
    finally:  # a message after a failure starts on a line of its own
        bar.close()
        profiler.close()
        preemption.close()
    elapsed = time.perf_counter() - started
    exported, why = export_choice(run)
    if run.rank == 0 and exported is not None:
        try:
            frozen = run.output_dir / MODEL_FILES / FROZEN_FILE if run.args.freeze_backbone else None
            notes = export_model(checkpoint=exported, config=engine.module.config, processor=run.processor,
                                 out=run.output_dir / MODEL_EXPORT, frozen=frozen)
            why += "".join(f", {note}" for note in notes)
        except OSError as e:
            raise WriteError(f"exporting {exported} to {run.output_dir / MODEL_EXPORT} failed: {write_failure(e)}; the "
                             f"checkpoint is complete: `python tools/export_checkpoint.py {exported} DIR` exports "
                             f"it anywhere") from e
    dist.barrier()
    images = (run.step - first_step) * run.ds_config["train_batch_size"]
    best = f"{run.best['top1']:.2%} at step {run.best['step']}" if run.best["top1"] is not None else "no eval"
    wandb = (f"{run.logger.run_dir.removesuffix('/files')} (upload: wandb sync DIR)" if run.logger.run_dir
             and run.logger.run.settings.mode == "offline" else (run.logger.run_dir or "disabled"))
    steps = run.step - first_step
    return (f"train: done, {steps} step{'s' * (steps != 1)} in {elapsed:.0f}s ({images / elapsed:.0f} images/s incl. "
            f"eval), best eval top-1 {best}\n"
            + (f"  model (save_pretrained; loads in transformers.pipeline): {run.output_dir / MODEL_EXPORT} "
               f"(from {exported.name}, {why})\n"
               f"  checkpoints: {run.checkpoints} (latest {run.last_saved.name})\n" if exported is not None else
               "  model and checkpoints: none (--save_steps 0)\n")
            + f"  metrics:     {run.output_dir / 'metrics.jsonl'}\n"
            + (f"  final eval:  {run.output_dir / RESULTS_FILE} (+ {PREDICTIONS_FILE}, {CONFUSION_FILE})\n"
               if run.eval_loader is not None else "")
            + f"  W&B run:     {wandb}")


def advance(run: Run, batches, meter: dict, bar) -> None:
    """One step of the loop: the next micro batches from `batches` (step_batches), train_step,
    and the hooks around it (NaN guard, meter, key log, train log, eval and checkpoint)."""
    run.doing = run.step + 1
    with record_function("data_wait"):
        micro_batches, wait = next(batches)
    meter["lr"] = run.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on after it)
    overflows = run.engine.skipped_steps
    with record_function("train_step"):
        loss = train_step(run, micro_batches)
        if run.ema is not None:
            run.ema.update()
    run.step += 1
    guard_non_finite(run, loss)
    count_step(run, meter, loss=loss, wait=wait, overflow=run.engine.skipped_steps != overflows)
    if run.args.record_keys:
        record_keys(run, micro_batches)
    if _due(run, run.args.log_steps):
        log_train(run, meter, bar)
    with record_function("eval_and_save"):
        evaluate_and_save(run, meter)


def new_meter() -> dict:
    """The log interval's running figures (count_step adds to them, log_train reads and resets them)."""
    return {"start": time.perf_counter(), "wait": 0.0, "steps": 0, "loss_sum": 0.0, "loss_n": 0}


class Preempted(RuntimeError):
    """SIGTERM or Ctrl-C: every rank saved at the agreed step and stops."""


class Preemption:
    """A graceful stop on SIGTERM (a scheduler preempting the job; the deepspeed launcher relays it
    to its ranks and kills them 30 s later), on Ctrl-C (a second one stops at once: Interrupted;
    not where the rank started with SIGINT ignored, as a background job), or when the `deepspeed`
    runner that started this node's launcher is gone (it does not relay SIGTERM on one node,
    deepspeed#4098: `kill` of its pid would leave the ranks training on without it). The first
    rank to see any posts a stop step, two steps ahead, and why, in the job's store (which
    PeerWatch polls too); every rank looks it up after each step (a store lookup, no device sync)
    and at that step all save a checkpoint and stop together. Ranks cannot be two steps apart
    (every step has collectives), so none has passed the step it reads."""

    KEY = "dali-deepspeed-vision/stop_at"
    RELAYED_S = 1.0  # a Ctrl-C this soon after the first is the same one relayed (torchrun sends its ranks SIGINT)

    def __init__(self, run: Run):
        self.run, self.store, self.at, self.why = run, dist.distributed_c10d._get_default_store(), None, None
        self.signalled: str | None = None  # why this rank wants to stop
        self.failed = False  # the loop ended on an error: SIGTERM is held on the way out (hold_sigterm)
        self.runner, self.looked = deepspeed_runner(), time.monotonic()
        self.previous = signal.signal(signal.SIGTERM, self._signal)
        self.previous_int, self.interrupted = signal.getsignal(signal.SIGINT), None  # when the first came
        if self.previous_int is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._interrupt)
        LOOP_SAVES.set()

    def _signal(self, signum, frame) -> None:
        self.signalled = self.signalled or "SIGTERM (preemption)"  # (the deepspeed launcher's after a Ctrl-C)

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted is not None:
            if time.monotonic() - self.interrupted > self.RELAYED_S:
                raise Interrupted()
            return
        self.interrupted, self.signalled = time.monotonic(), self.signalled or "Ctrl-C"
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print("\ntrain: Ctrl-C: every rank saves a checkpoint within two steps and stops; Ctrl-C again stops "
                  "at once, without saving", file=sys.stderr, flush=True)

    def due(self) -> bool:
        """Whether the run stops after this step."""
        if self.runner and not self.signalled and time.monotonic() - self.looked > 1:
            self.looked = time.monotonic()
            if not self._runner_alive():
                self.signalled = f"the deepspeed runner (pid {self.runner[1]} on {socket.gethostname()}) is gone"
        if self.signalled and self.at is None and self.store.add(f"{self.KEY}/posted", 1) == 1:
            self.store.set(f"{self.KEY}/why", self.signalled)
            self.store.set(self.KEY, str(self.run.step + 2))
        if self.at is None and (self.signalled or self.store.check([self.KEY])):
            self.store.wait([self.KEY])  # another rank may be between its post and its set
            self.at, self.why = int(self.store.get(self.KEY)), self.store.get(f"{self.KEY}/why").decode()
        return self.at is not None and self.run.step >= self.at

    def _runner_alive(self) -> bool:
        launcher, pid = self.runner
        try:
            return launcher.ppid() == pid
        except psutil.Error:  # the launcher is gone too
            return False

    def stop(self) -> None:
        """Saves this step (unless its cadence just did, or --save_steps 0) and raises Preempted."""
        run = self.run
        if run.save_steps and run.last_saved != checkpoint_path(run.checkpoints, run.step):
            if run.args.nan_guard == "stop":
                check_losses(run)  # as before any checkpoint
            average_buffers(run.engine.module)
            run.last_saved = save(run)
        what = (f"saved {run.last_saved}; --resume auto goes on from it" if run.save_steps else
                "nothing was saved (--save_steps 0)")
        raise Preempted(f"{self.why}: every rank stopped after step {run.step}; {what}")

    def close(self) -> None:
        if self.failed:
            hold_sigterm()
        else:
            signal.signal(signal.SIGTERM, self.previous)
        if self.previous_int is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self.previous_int)
        LOOP_SAVES.clear()


class StepProfiler:
    """--profile START:STEPS: torch.profiler over optimizer steps START+1..START+STEPS on every rank,
    written to OUTPUT/profile/rank{R}.json (Chrome trace: open in https://ui.perfetto.dev) and
    rank{R}.txt (the top operators by self time). The loop marks `data_wait`, `train_step` and
    `eval_and_save`, so the trace shows where a step's time goes."""

    def __init__(self, run: Run):
        self.run, self.profile = run, None
        self.start = self.stop = -1
        if run.args.profile:
            first, count = (int(part) for part in run.args.profile.split(":"))
            self.start, self.stop = first, first + count

    def before_step(self) -> None:
        if self.run.step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.run.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()

    def after_step(self) -> None:
        if self.profile is not None and self.run.step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.profile is None:
            return
        get_accelerator().synchronize()
        self.profile.stop()
        folder = self.run.output_dir / "profile"
        folder.mkdir(exist_ok=True)
        self.profile.export_chrome_trace(str(folder / f"rank{self.run.rank}.json"))
        by = "self_cuda_time_total" if self.run.device.type == "cuda" else "self_cpu_time_total"
        (folder / f"rank{self.run.rank}.txt").write_text(
            f"steps {self.start + 1}-{self.run.step}, sorted by {by}\n"
            + self.profile.key_averages().table(sort_by=by, row_limit=30) + "\n")
        if self.run.rank == 0:
            tqdm.write(f"train: profile of steps {self.start + 1}-{self.run.step} in {folder}")
        self.profile = None


def count_step(run: Run, meter: dict, *, loss: torch.Tensor | None, wait: float, overflow: bool) -> None:
    """The step into the log interval's meter. A step whose update was not applied still moves the
    schedule on, so that the learning rate follows the step count and the run ends where its
    schedule does: one the NaN guard skipped (`loss` None: nothing reached DeepSpeed), or one
    DeepSpeed skipped itself for non-finite gradients (`overflow`: an fp16 loss-scale overflow,
    after which DeepSpeed halves the scale and leaves its scheduler where it was)."""
    if (loss is None or overflow) and run.engine.lr_scheduler is not None:
        run.engine.lr_scheduler.step()
    if loss is not None:
        meter["loss_sum"], meter["loss_n"] = meter["loss_sum"] + loss, meter["loss_n"] + 1
    meter["wait"] += wait
    meter["steps"] += 1


def evaluate_and_save(run: Run, meter: dict) -> None:
    """Eval and checkpoint at their cadence, and both after the last step; with --export best, also
    a checkpoint at each new best eval between saves, so that the best eval is the export."""
    evaluating, saving = _eval_due(run), _save_due(run)
    if not (evaluating or saving):
        return
    with off_the_clock(meter, run.device):
        average_buffers(run.engine.module)
        if evaluating:
            log_eval(run, evaluate(run, details=run.step == run.total_steps))
            saving = saving or bool(run.save_steps) and run.args.export == "best" and run.best["step"] == run.step
        if saving:
            run.last_saved = save(run)


@contextlib.contextmanager
def off_the_clock(meter: dict, device: torch.device):
    """The time inside left out of the log interval's throughput (perf/images_per_sec, step_time,
    tflops, mfu): evals and checkpoints are not training, and would show as dips on the dashboard
    at each one (a checkpoint of a large model takes seconds). The training work the GPU still has
    queued is finished first: it counts as training."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    paused = time.perf_counter()
    try:
        yield
    finally:
        meter["start"] += time.perf_counter() - paused


def evaluate_missed(run: Run) -> None:
    """The eval due at the step resumed from, when the run that saved it did not make it: one
    resumed on other ranks or batch sizes can find the rest of its epoch too short for a step, so
    that the epoch ended at the checkpoint, which a SIGTERM stop or --save_steps saved without an
    eval. The checkpoint records the eval's top-1, as a checkpoint saved at an eval does, for the
    pruning and --export best (another run's checkpoint is then saved in this run's output dir).
    A run that ends at that step, evaluated already, gets its final eval's files if the output dir
    lacks them (_final_eval_written)."""
    if not run.step or not _eval_due(run):
        return
    if run.last_eval.get("step") == run.step:
        if run.step == run.total_steps and not _final_eval_written(run):
            run.doing = run.step  # (logged already: its files alone)
            average_buffers(run.engine.module)
            evaluate(run, details=True)
            run.doing = run.step + 1
        return
    mine = run.last_saved is not None and run.last_saved == checkpoint_path(run.checkpoints, run.step)
    if mine and (recorded := checkpoint_info(run.last_saved).get("top1")) is not None:
        _note_best(run, recorded)  # an earlier resume from it evaluated and logged it
        return
    run.doing = run.step  # its hooks
    average_buffers(run.engine.module)
    log_eval(run, evaluate(run, details=run.step == run.total_steps))
    if mine:
        if run.rank == 0:
            record_top1(run.last_saved, run.last_eval["eval/top1"])
        dist.barrier()
    elif run.save_steps:  # another run's checkpoint: this run's own copy holds the eval for --export best
        run.last_saved = save(run)
    run.doing = run.step + 1


def _final_eval_written(run: Run) -> bool:
    """Whether the output dir holds the final eval's files of this step (decided by rank 0 for all).
    A run that ends at the step it resumed from trains nothing and so evaluates nothing; when it
    went back to an earlier checkpoint, the files of the line it left were moved aside with it."""
    written = [None]
    if run.rank == 0:
        with contextlib.suppress(OSError, ValueError):
            written[0] = json.loads((run.output_dir / RESULTS_FILE).read_text()).get("step") == run.step
    dist.broadcast_object_list(written, src=0)
    return bool(written[0])


def _due(run: Run, every: int, *, offset: int = 0) -> bool:
    """Whether a hook that runs every `every` steps (at steps = `offset` modulo `every`), and after
    the last, runs at this step (never when `every` is 0: --save_steps 0)."""
    return bool(every) and ((run.step - offset) % every == 0 or run.step == run.total_steps)


def _eval_due(run: Run) -> bool:
    return run.eval_loader is not None and _due(run, run.eval_steps, offset=run.eval_offset)


def _save_due(run: Run) -> bool:
    return _due(run, run.save_steps, offset=run.save_offset)


def step_batches(loader, *, accum: int):
    """Yields (the `accum` micro batches of one optimizer step, seconds spent waiting for them),
    across epochs; an epoch's last micro batches that do not fill a step are dropped."""
    while True:
        group, wait, tick = [], 0.0, time.perf_counter()
        for batch in loader:
            wait += time.perf_counter() - tick
            group.append(batch)
            if len(group) == accum:
                yield group, wait
                group, wait = [], 0.0
            tick = time.perf_counter()


def train_step(run: Run, micro_batches: list[dict]) -> torch.Tensor | None:
    """One optimizer step: forward, backward and DeepSpeed's step for each micro batch (DeepSpeed
    accumulates and steps the optimizer on the last). With --nan_guard skip, a micro batch whose
    loss is not finite on any rank is backpropagated on none: when other micro batches of the step
    are finite, it is replaced by a zero-weighted pass (so that DeepSpeed's hooks, gradient
    reductions and micro-step count run as always, on every ZeRO stage) and the step applies the
    finite ones' gradients; when none is, nothing reaches DeepSpeed and the step is skipped. With
    --nan_guard stop every micro batch goes through, unchecked here (guard_non_finite checks at
    its cadence). Returns this rank's mean loss over the micro batches used, None when the step
    was skipped."""
    skipping = run.args.nan_guard == "skip"
    losses, replaced = [], []
    buffers = [b for b in run.engine.module.buffers() if b.is_floating_point()] if skipping else []
    for micro, batch in enumerate(micro_batches, start=1):
        saved = [b.clone() for b in buffers]  # a forward updates BatchNorm statistics, finite or not
        pixels = erase_batch(batch["pixel_values"], prob=run.args.random_erase)
        pixels, targets = mix_batch(pixels, batch["labels"], num_classes=len(run.classes),
                                    mixup_alpha=run.args.mixup_alpha, cutmix_alpha=run.args.cutmix_alpha,
                                    rng=run.mix_rng)
        _inject_failure(run)
        logits = run.engine(pixel_values=_inject_nan(run, pixels, micro)).logits
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=run.args.label_smoothing)
        if not skipping or all_ranks_finite(loss):
            run.engine.backward(loss)
            run.engine.step()
            losses.append(loss.detach())
        else:
            _restore_buffers(buffers, saved)
            replaced.append(pixels)
    if losses:
        for pixels in replaced:
            _null_pass(run, pixels, buffers)
    return torch.stack(losses).mean() if losses else None


def _null_pass(run: Run, like: torch.Tensor, buffers: list[torch.Tensor]) -> None:
    """A micro batch that contributes zero gradient: forward on zeros, backward of 0 x the logits."""
    saved = [b.clone() for b in buffers]
    logits = run.engine(pixel_values=torch.zeros_like(like)).logits
    run.engine.backward(logits.float().sum() * 0.0)
    run.engine.step()
    _restore_buffers(buffers, saved)


def _restore_buffers(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks then take the same branch)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def evaluate(run: Run, *, details: bool = False) -> dict:
    """Loss, top-1 and top-5 over the eval split, each sample counted once across ranks (after
    average_buffers: every rank evaluates with the same BatchNorm statistics). With `details`
    (--eval_only, and a training run's final eval) also the predictions, per-class results and
    confusion matrix of train/evaluation.py, written to the output dir. With --ema_decay, of the
    weight average (with its average of the BatchNorm statistics: what the export holds), and the
    trained weights' loss, top-1 and top-5 under eval_no_ema/."""
    if run.ema is None:
        return _eval_pass(run, details=details)
    trained = _eval_pass(run)
    with run.ema.applied():
        result = _eval_pass(run, details=details)
    return {**result, **{key.replace("eval/", "eval_no_ema/"): value for key, value in trained.items()
                         if key.startswith("eval/") and key != "eval/samples_counted"}}


@torch.no_grad()
def _eval_pass(run: Run, *, details: bool = False) -> dict:
    """One pass of the model as it is over the eval split (evaluate)."""
    run.engine.eval()
    writer = PredictionWriter(run.output_dir, rank=run.rank, classes=run.classes) if details else None
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # loss, top-1, top-5 hits, samples
    samples = None
    shown = run.rank == 0 and run.args.eval_only  # a training run's evals sit under its step bar
    for batch in tqdm(run.eval_loader, total=len(run.eval_loader), disable=not shown, desc="eval", unit="batch",
                      dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30):
        logits = run.engine(pixel_values=batch["pixel_values"]).logits.float()
        labels, mask = batch["labels"], batch["mask"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums += torch.stack([(loss * mask).sum(), (hits[:, 0] & mask).sum(), (hits.any(1) & mask).sum(),
                             mask.sum()]).to(sums)
        if samples is None and run.rank == 0:
            samples = (batch["pixel_values"][mask][:16], labels[mask][:16], logits[mask][:16].argmax(1))
        if writer:
            writer.add(keys=batch["keys"], labels=labels, logits=logits, mask=mask)
    dist.all_reduce(sums)
    run.engine.train()
    loss, top1, top5, count = sums.tolist()
    result = {"eval/loss": loss / count, "eval/top1": top1 / count, "eval/top5": top5 / count,
              "eval/samples_counted": count, "_samples": samples, "_report": None}
    if writer:
        writer.close()
        result["_report"] = eval_report(run, result)
    return result


def eval_report(run: Run, scalars: dict):
    """Rank 0 joins the ranks' predictions and writes the results (train/evaluation.py); the
    Report on rank 0, None elsewhere."""
    dist.barrier()  # every part is complete
    report = None
    if run.rank == 0:
        context = {"model": run.args.model or run.args.model_config or "built-in", "data": str(run.data),
                   "split": run.args.eval_split, "step": run.step, "eval_only": run.args.eval_only}
        report = summarize(join_predictions(run.output_dir, run.world_size), classes=run.classes, scalars=scalars,
                           context=context)
        report.paths = write_report(report, run.output_dir, classes=run.classes)
    dist.barrier()
    return report


# --- hooks around the loop ----------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


def guard_non_finite(run: Run, loss: torch.Tensor | None) -> None:
    """--nan_guard skip: counts skipped steps; stops after --max_bad_steps consecutive ones.
    --nan_guard stop: counts non-finite losses on the device, and at every step that logs,
    evaluates or saves (and so before any checkpoint) checks them on every rank (the host sync
    it saves on the other steps); stops at the first."""
    if run.args.nan_guard == "stop":
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        run.unchecked = bad if run.unchecked is None else run.unchecked + bad
        if _due(run, run.args.log_steps) or _eval_due(run) or _save_due(run):
            check_losses(run)
        return
    if loss is not None:
        run.bad_steps = 0
        return
    run.bad_steps += 1
    run.skipped_steps += 1
    if run.bad_steps >= run.args.max_bad_steps:
        raise NonFiniteLoss(f"{run.bad_steps} consecutive steps (to step {run.step}) had a non-finite loss on some "
                            f"rank and were skipped; lower --lr, check the data, or raise --max_bad_steps")


def check_losses(run: Run) -> None:
    """--nan_guard stop: the non-finite losses counted since the last check, summed over the ranks;
    NonFiniteLoss if there is any."""
    if run.unchecked is None:
        return
    dist.all_reduce(run.unchecked)
    if run.unchecked.item():
        when = (f"at step {run.step}" if run.checked_step + 1 == run.step else
                f"between steps {run.checked_step + 1} and {run.step}")
        raise NonFiniteLoss(f"the train loss was not finite on some rank {when} (--nan_guard stop); lower --lr or "
                            f"check the data; --nan_guard skip steps over such batches")
    run.unchecked, run.checked_step = None, run.step


def log_train(run: Run, meter: dict, bar) -> None:
    """train/ and perf/ scalars, averaged over the steps since the last log (train/loss: over the
    steps applied, on every rank; absent when all were skipped)."""
    get_accelerator().synchronize()  # the interval's time is real
    elapsed = time.perf_counter() - meter["start"]
    images_per_sec = meter["steps"] * run.ds_config["train_batch_size"] / elapsed
    scalars = {"train/lr": meter["lr"], "train/skipped_steps": run.skipped_steps,
               "train/overflow_steps": run.engine.skipped_steps,  # in DeepSpeed's checkpoints: resumes with it
               "perf/images_per_sec": images_per_sec, "perf/step_time": elapsed / meter["steps"],
               "perf/data_wait_fraction": meter["wait"] / elapsed, "train/epoch": _epochs_done(run)}
    if run.flops_per_image:
        scalars["perf/tflops"] = run.flops_per_image * images_per_sec / run.world_size / 1e12  # per device
        if run.peak_tflops:
            scalars["perf/mfu"] = scalars["perf/tflops"] / run.peak_tflops
    if meter["loss_n"]:  # the same count on every rank: skipped steps are agreed
        loss = meter["loss_sum"].clone()
        dist.all_reduce(loss)
        scalars["train/loss"] = loss.item() / (run.world_size * meter["loss_n"])
    if run.precision == "fp16":
        scalars["train/loss_scale"] = float(run.engine.optimizer.cur_scale)
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    if run.device.type == "cuda":
        scalars["perf/gpu_mem"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.logger.log(run.step, scalars)
    bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.3f}", img_s=f"{images_per_sec:.0f}", refresh=False)
    meter.update(new_meter())


def _epochs_done(run: Run) -> float:
    """From the loader, which knows an epoch resumed with other ranks; stand-ins count steps."""
    progress = getattr(run.train_loader, "progress", None)
    return progress(accum=run.ds_config["gradient_accumulation_steps"]) if progress else run.step / run.steps_per_epoch


def log_eval(run: Run, result: dict) -> None:
    samples, report = result.pop("_samples"), result.pop("_report")
    run.last_eval = {"step": run.step, **result}
    _note_best(run, result["eval/top1"])
    run.logger.log(run.step, result)
    _summarize_best(run)
    if samples is not None:
        pixels, true, predicted = samples
        run.logger.log_samples(run.step, images=viewable(pixels, mean=run.spec.pixel_mean, std=run.spec.pixel_std),
                               true=[run.classes[i] for i in true.tolist()],
                               predicted=[run.classes[i] for i in predicted.tolist()])
    if report is not None:
        run.logger.log_details(run.step, results=report.results, classes=run.classes, true_ids=report.true_ids,
                               predicted_ids=report.predicted_ids, picture=report.paths["confusion_matrix"])
    if run.rank == 0 and not run.args.eval_only:
        tqdm.write(f"step {run.step}: eval loss {result['eval/loss']:.4f}, top-1 {result['eval/top1']:.2%}, "
                   f"top-5 {result['eval/top5']:.2%} ({int(result['eval/samples_counted'])} images)"
                   + (f"; EMA (without: top-1 {result['eval_no_ema/top1']:.2%})" if "eval_no_ema/top1" in result else ""))


def _note_best(run: Run, top1: float) -> None:
    """This step's eval `top1` becomes run.best when it is at least as good (the newest among equals,
    as exported)."""
    if run.best["top1"] is None or top1 >= run.best["top1"]:
        run.best = {"top1": top1, "step": run.step}


def _summarize_best(run: Run) -> None:
    """The best eval so far in W&B's summary (the runs table's columns), not charted."""
    run.logger.summarize({"eval/best_top1": run.best["top1"], "eval/best_step": run.best["step"]})


def record_keys(run: Run, micro_batches: list[dict]) -> None:
    with open(_keys_log(run), "a") as f:
        f.write(json.dumps({"step": run.step, "keys": [k for b in micro_batches for k in b["keys"]]}) + "\n")


def _keys_log(run: Run) -> Path:
    return run.output_dir / "sample_keys" / f"rank{run.rank}.jsonl"


def export_choice(run: Run) -> tuple[Path | None, str]:
    """The checkpoint to export and why: with --export best, the complete one with the best eval
    top-1 (the newest among equals; the pruning keeps it; a damaged one is passed over, and the why
    says so), else, or without evals, the last; None with --save_steps 0 (this run saved nothing to
    export)."""
    if not run.save_steps:
        return None, "--save_steps 0"
    passed = ""
    if run.args.export == "best":
        scored = [(checkpoint_info(p).get("top1"), p.name, p) for p in complete_checkpoints(run.checkpoints)[0]]
        for _, _, path in sorted((s for s in scored if s[0] is not None), reverse=True):
            # an earlier line's checkpoint may have been damaged since (this run's last one was just
            # written); rank 0 alone exports
            if path == run.last_saved or run.rank != 0 or not (why := any_damage(path)):
                return path, "the best by eval top-1" + passed
            passed += f"; passed over {path.name}, damaged: {why}"
    return run.last_saved, "the last" + passed


def average_buffers(module: torch.nn.Module) -> None:
    """Averages floating-point buffers (BatchNorm running statistics) over the ranks, as timm's
    distribute_bn does: each rank updates them from its own batches and DeepSpeed leaves them apart,
    so eval on every rank, the checkpoint (rank 0's copy, which every rank resumes with) and the
    export would disagree. Called before every eval and save, in training mode: the buffers of
    modules held in eval mode (a frozen backbone's) are left alone, as their forward leaves them
    (an average of equal values is not always equal to them)."""
    for part in module.modules():
        for buffer in part.buffers(recurse=False) if part.training else ():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()


def save(run: Run) -> Path:
    """save_checkpoint, warned about beforehand when the disk looks too full for it; a failed write
    is a WriteError naming the checkpoint, the cause and the newest complete checkpoint."""
    top1 = run.last_eval.get("eval/top1") if run.last_eval.get("step") == run.step else None
    path = checkpoint_path(run.checkpoints, run.step)
    if run.rank == 0 and run.last_saved is not None and run.last_saved.is_dir():
        # the output dir: its checkpoints/ is first made by this save when the run resumed from elsewhere
        free, needed = shutil.disk_usage(run.output_dir).free, folder_bytes(run.last_saved)
        if free < needed:
            tqdm.write(f"train: warning: {free / 2**20:.1f} MiB free in {run.checkpoints}, the last checkpoint took "
                       f"{needed / 2**20:.1f} MiB: saving {path.name} will likely fail", file=sys.stderr)
    try:
        return save_checkpoint(run.engine, root=run.checkpoints, step=run.step, state=trainer_state(run),
                               rank=run.rank, top1=top1, keep=run.args.save_total_limit,
                               average=run.ema.state_dict() if run.ema is not None else None)
    except Exception as e:
        if (cause := write_failure(e)) is None:
            raise
        newest = (f"the newest complete checkpoint is {run.last_saved} (--resume auto goes on from it once the "
                  f"cause is fixed)" if run.last_saved else "no checkpoint of this run is complete")
        raise WriteError(f"saving checkpoint {path} failed: {cause}; {newest}") from e


def trainer_state(run: Run) -> dict:
    """Everything this rank needs to resume besides DeepSpeed's own state."""
    accum = run.ds_config["gradient_accumulation_steps"]
    return {"step": run.step, "train_loader": run.train_loader.state_dict(accum=accum), "best": run.best,
            "skipped_steps": run.skipped_steps, "bad_steps": run.bad_steps,
            "last_eval": run.last_eval, "classes": len(run.classes), "order": run.order, "recipe": run.recipe,
            "wandb_run_id": run.logger.run_id, "wandb_run_name": run.logger.run_name,
            "mix_rng": run.mix_rng.bit_generator.state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None}}


def _resume(run: Run, path: Path, state: dict, *, other_ranks: bool) -> None:
    """DeepSpeed's state and this rank's trainer `state` from the checkpoint `path`. One saved by
    `other_ranks` loads through DeepSpeed's universal form (the engine was made for it), and each
    rank's random streams start afresh (rank 0's `state` is every rank's)."""
    where = None
    if other_ranks:
        problems = [f"--resume {path}: saved by {state['ranks']} rank(s); on {run.world_size}, rank {run.rank} holds no "
                    f"part of the parameter group of {', '.join(names)} ({values} values), which DeepSpeed's universal "
                    f"checkpoint cannot load under ZeRO-1/2: resume on {state['ranks']} rank(s), {restart_hint(path)}"
                    for names, values in universal_gaps(run.engine)]
        agree(problems)
        if problems:
            raise ConfigError(problems)
        if run.rank == 0:
            print(f"train: {path.name} was saved by {state['ranks']} rank(s): converting it to DeepSpeed's universal "
                  f"checkpoint for {run.world_size}", flush=True)
        where = universal_checkpoint(path, into=run.checkpoints / ".universal", rank=run.rank)
    load_checkpoint(run.engine, path, universal=where)
    if where is not None:
        drop_universal(where, rank=run.rank)
    if run.ema is not None:
        _resume_average(run, path)
    run.step, run.best, run.last_eval = state["step"], state["best"], state["last_eval"]
    run.skipped_steps, run.bad_steps = state["skipped_steps"], state["bad_steps"]
    run.last_saved = path
    if other_ranks:
        seed_streams(run.args.seed, rank=run.rank, step=run.step)
        run.mix_rng = np.random.default_rng([run.args.seed, run.rank, run.step])
        return
    run.mix_rng.bit_generator.state = state["mix_rng"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _resume_average(run: Run, path: Path) -> None:
    """The weight average saved in the checkpoint `path` (by any number of ranks); one saved without
    (--ema_decay turned on at this resume) starts the average from its weights."""
    saved = path / EMA_FILE
    if not saved.is_file():
        run.ema.reset()
        if run.rank == 0:
            print(f"train: {path.name} holds no weight average: the average (--ema_decay) starts from its weights",
                  flush=True)
        return
    try:
        run.ema.load_state_dict(torch.load(saved, map_location="cpu", mmap=True, weights_only=True), source=str(saved))
    except ValueError as e:  # the same file on every rank: all stop together
        raise CheckpointError(f"--resume {path}: {e}") from e


def seed_streams(seed: int, *, rank: int, step: int) -> None:
    """torch's, numpy's and Python's random streams of this rank (dropout, drop path): its own,
    not a copy of the other ranks' (the weights were initialized alike from --seed)."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]) ^ int(state[1]))


# --- plumbing -----------------------------------------------------------------------------------

def _inject_failure(run: Run) -> None:
    """Fault injection for tests: TRAIN_FAIL_AT="RANK:STEP" raises an unexpected error on that rank
    in STEP (a bug, a device fault): the rank fails alone and its peers wait in a collective.
    "RANK:STEP:kill" kills the rank outright instead (SIGKILL, as the OOM killer does);
    "RANK:STEP:hang" makes it wait as a collective waits for a peer that died under NCCL (no error
    comes: GPUs of one node talk through memory) until the backend's timeout (here 10 minutes);
    "RANK:STEP:pause=S" makes it wait S seconds in Python and go on (in short sleeps: a signal's
    handler runs at once whichever thread the kernel gave the signal to). Several, comma-separated."""
    for spec in filter(None, os.environ.get("TRAIN_FAIL_AT", "").split(",")):
        rank, step, *how = spec.split(":")
        if [int(rank), int(step)] != [run.rank, run.step + 1]:
            continue
        if how == ["kill"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if how and how[0].startswith("pause="):
            until = time.monotonic() + float(how[0].removeprefix("pause="))
            while time.monotonic() < until:
                time.sleep(0.05)
            continue
        if how == ["hang"]:
            time.sleep(600)
        raise RuntimeError(f"injected {'timeout' if how else 'failure'} (TRAIN_FAIL_AT={spec})")


def _inject_nan(run: Run, pixels: torch.Tensor, micro: int) -> torch.Tensor:
    """Fault injection for tests: TRAIN_NAN_AT="RANK:STEP,STEP.MICRO" feeds NaN pixels on that rank
    to every micro batch of STEP, and to micro batch MICRO (from 1) of another."""
    spec = os.environ.get("TRAIN_NAN_AT")
    if spec:
        rank, steps = spec.split(":")
        if int(rank) == run.rank and {str(run.step + 1), f"{run.step + 1}.{micro}"} & set(steps.split(",")):
            return torch.full_like(pixels, float("nan"))
    return pixels


def _data_threads(device: torch.device) -> int:
    """DALI threads per rank: the rank's share of the cores, half of it on a CPU device, where the
    model computes on the same cores (measured: 2 threads for 1 rank on 2 cores cost ~5% more
    training throughput than 1 thread, with data wait under 2% either way)."""
    return cpu_share() if device.type == "cuda" else max(1, cpu_share() // 2)


def _with_recipe(args: TrainArgs, recipe: dict) -> TrainArgs:
    """The recipe's values for the arguments the command line did not give."""
    return dataclasses.replace(args, **{key: value for key, value in recipe.items() if key not in args.given})


def _model_name(args: TrainArgs, model) -> str:
    if args.model:
        path = Path(args.model.rstrip("/"))
        return path.parent.name if path.name == MODEL_EXPORT and path.parent.name else path.name  # a run's export
    if args.model_config:
        return Path(args.model_config).stem
    return f"{model.config.model_type}-tiny" if model is not None else "model"


def _quiet_libraries(rank: int) -> None:
    from deepspeed.utils import logger as ds_logger
    import transformers

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19's ZeRO collectives (deepspeed/comm/torch.py) call the torch.distributed names
    # that torch 2.13 deprecates: one FutureWarning per rank and name that no user can act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            r"deprecated", FutureWarning)
    os.environ.setdefault("WANDB_SILENT", "true")
    if rank != 0:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" once, not once per rank


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # its traceback as Python prints it, then the same way out
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_rank(code)
