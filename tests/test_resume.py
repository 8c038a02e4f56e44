"""Resume exactly, survive kills and bad data: the trainer under the real launcher, 2 CPU ranks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import (ROOT, common, evals, finish, launcher, metrics, photo, rank_processes, signal_ranks,
                      train, two_nodes)
from pipelines.shards import file_sha256


def resume_args(files, out: Path) -> list[str]:
    """8 steps over 36 images, 3 steps an epoch: checkpoints at 2, 4 (mid-epoch), 6 and 8."""
    return ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "8",
            "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "2", "--eval_steps", "4", "--record_keys"]


def wait_for(paths: list[Path], timeout: float = 300, *, job: subprocess.Popen | None = None) -> None:
    """Until every path exists; fails at the timeout, or as soon as `job` has ended."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        assert job is None or job.poll() is None, f"the job ended (exit {job.returncode}) before {paths} appeared"
        time.sleep(0.1)


def wait_for_text(log: Path, text: str, *, job: subprocess.Popen, timeout: float = 120) -> None:
    """Until the running `job` has written `text` to its `log`."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


def wait_in_frame(job: subprocess.Popen, log: Path, frame: str, *, ranks: int = 2, timeout: float = 180) -> None:
    """Until each of the `ranks` ranks of the running `job` has `frame` (a file name) in its stacks:
    a rank prints them into the job's `log` on SIGUSR1 (faulthandler, once its handler is set, which
    /proc's SigCgt says), one rank at a time."""
    deadline = time.monotonic() + timeout
    while len(found := rank_processes(job)) < ranks:
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    for rank in found:
        while True:
            assert time.monotonic() < deadline and job.poll() is None, f"rank not in {frame}: {log.read_text()[-5000:]}"
            status = Path(f"/proc/{rank.pid}/status").read_text()
            if int(re.search(r"SigCgt:\s*(\w+)", status).group(1), 16) >> (signal.SIGUSR1 - 1) & 1:
                start = log.stat().st_size
                rank.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
                with open(log) as f:
                    f.seek(start)
                    if frame in f.read():  # (no thread but the main one calls torch's build lock)
                        break
            time.sleep(0.5)


def wait_for_step(out: Path, step: int, *, job: subprocess.Popen, timeout: float = 300) -> None:
    """Until the running `job` has logged the train loss of `step` in OUT/metrics.jsonl."""
    wait_for([out / "metrics.jsonl"], timeout, job=job)
    deadline = time.monotonic() + timeout
    while max(losses_by_step(out), default=0) < step:
        assert time.monotonic() < deadline and job.poll() is None, f"the run did not reach step {step}"
        time.sleep(0.1)


def losses_by_step(out: Path) -> dict[int, float]:
    rows = [m for m in metrics(out) if "train/loss" in m]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {m["step"]: m["train/loss"] for m in rows}


def shm_left(done: subprocess.CompletedProcess) -> list[str]:
    """DeepSpeed's all-reduce buffers in /dev/shm (66 MB a rank) that the job `done` left behind: its
    CPU ranks no longer build the op that creates them (train/distributed.py), which never removed them."""
    port = done.args[done.args.index("--master_port") + 1]
    return [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")]


def keys_by_step(out: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines()
    return [(row["step"], row["keys"]) for row in map(json.loads, lines)]


def test_killed_mid_save_and_resumed_equals_straight_through(files, tmp_path):
    import torch
    from transformers import pipeline

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(resume_args(files, straight) + ["--save_total_limit", "10"])  # keeps step 4, resumed from below

    # kill the whole job while it saves step 6: both ranks wrote their files, none marked it complete
    job = subprocess.Popen(launcher(ranks=2) + resume_args(files, resumed), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "WANDB_MODE": "offline", "TRAIN_PAUSE_SAVE_AT_STEP": "6"})
    partial = resumed / "checkpoints" / "step-00000006"
    try:
        wait_for([partial / "trainer_state_rank0.pt", partial / "trainer_state_rank1.pt"])
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (partial / "complete.json").exists()
    assert (resumed / "checkpoints" / "latest").read_text() == "step-00000004"
    assert max(losses_by_step(resumed)) == 6  # steps 5 and 6 ran and were logged before the kill

    # the partial checkpoint is refused by name, skipped by auto
    explicit = train(resume_args(files, resumed) + ["--resume", str(partial)], check=False)
    assert explicit.returncode == 2 and (f"--resume {partial} is an interrupted save (no complete.json: not every "
                                         f"rank finished writing it); pass another, e.g. the newest complete, "
                                         f"{resumed / 'checkpoints' / 'step-00000004'}") in explicit.stderr
    # another seed or other train shards (same classes) are refused: the epochs' order would not
    # be the one the checkpoint's position counts in, training again samples it already saw
    from make_shards import make_shards

    make_shards(src=files["root"] / "photos", out=tmp_path / "reshard", val_fraction=0.25, max_count=5, progress=False)
    changed = resume_args(files, resumed)
    changed[changed.index("--data") + 1] = str(tmp_path / "reshard")
    other_order = train(changed + ["--seed", "1", "--resume", "auto"], check=False)
    assert other_order.returncode == 2, other_order.stderr[-3000:]
    for expected in ("saved by a run with --seed 0, this run has --seed 1; resume with --seed 0",
                     "trained on other train shards", "tools/export_checkpoint.py"):
        assert expected in other_order.stderr, other_order.stderr[-3000:]
    # and only they: step 4 is before --max_steps 8 (the other problems stop the loaders before they count)
    assert "past this run's last step" not in other_order.stderr, other_order.stderr[-3000:]
    exported = tmp_path / "step4-model"
    subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"),
                    str(resumed / "checkpoints" / "step-00000004"), str(exported)], check=True, capture_output=True)
    # the run's folder, or an interrupted save, instead of a checkpoint: which one to pass
    from train.checkpoint import not_a_checkpoint

    complete = sorted(p.name for p in (resumed / "checkpoints").glob("step-*") if (p / "complete.json").is_file())
    assert complete[-1] == "step-00000004"  # step 6: killed mid-save
    for given in (resumed, resumed / "checkpoints"):
        assert not_a_checkpoint(given) == (f"{given} holds checkpoints, and is none: pass one, e.g. the newest "
                                           f"complete, {resumed / 'checkpoints' / 'step-00000004'} ({len(complete)} "
                                           f"in {resumed / 'checkpoints'})")
    assert not_a_checkpoint(resumed / "checkpoints" / "step-00000006").endswith(
        f"is an interrupted save (no complete.json: not every rank finished writing it); pass another, e.g. the "
        f"newest complete, {resumed / 'checkpoints' / 'step-00000004'}")
    classifier = pipeline("image-classification", model=str(exported))
    assert {r["label"] for r in classifier(photo(0, (48, 40)), top_k=4)} == {f"class{i}" for i in range(4)}

    done = train(resume_args(files, resumed) + ["--resume", "auto"], env={"WANDB_MODE": "offline"})
    assert "ignoring 1 incomplete checkpoint(s) (interrupted saves): step-00000006" in done.stdout
    assert f"resuming from {resumed / 'checkpoints' / 'step-00000004'} (step 4)" in done.stdout

    # the same steps, losses, data order and final weights as the run that was never stopped
    expected, got = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]  # bit for bit (torch's AdamW)
    for rank in (0, 1):
        assert keys_by_step(resumed, rank) == keys_by_step(straight, rank)
        assert [s for s, _ in keys_by_step(resumed, rank)] == list(range(1, 9))
    weights, reference = load_file(resumed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name in weights:
        assert torch.equal(weights[name], reference[name]), name
    # a checkpoint of another run resumes into a new output dir, and goes on as that run did
    elsewhere = tmp_path / "elsewhere"
    train(resume_args(files, elsewhere) + ["--resume", str(straight / "checkpoints" / "step-00000004")])
    assert [losses_by_step(elsewhere)[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]
    assert (elsewhere / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (elsewhere / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    complete = sorted(p.parent.name for p in (resumed / "checkpoints").glob("step-*/complete.json"))
    assert complete[-2:] == ["step-00000006", "step-00000008"]
    assert all((p / "complete.json").exists() for p in (resumed / "checkpoints").glob("step-*"))
    # one W&B run, continued: both offline run folders carry the same run id, and the resumed part
    # logs steps 5 and 6 again on the trainer's step axis (online, W&B drops them on its own axis),
    # and the rows up to step 4 that the killed part's W&B process had not written
    from test_train import wandb_history

    run_ids = {p.name.rsplit("-", 1)[-1] for p in (resumed / "wandb").glob("offline-run-*")}
    assert len(list((resumed / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1
    killed_history, resumed_history = wandb_history(resumed, 0)[0], wandb_history(resumed, 1)[0]
    lacking = {m["step"] for m in metrics(resumed)
               if m["step"] <= 4 and not set(m) - {"step"} <= set(killed_history.get(m["step"], ()))}
    assert sorted(resumed_history) == sorted(lacking | {5, 6, 7, 8}), (sorted(killed_history), sorted(resumed_history))
    assert [resumed_history[s]["train/loss"] for s in range(5, 9)] == pytest.approx([got[s] for s in range(5, 9)])
    assert_wandb_holds(resumed)

    # a checkpoint damaged since its save (a copy cut short, a changed byte, which torch.load reads
    # as a wrong weight without a word) is refused before any file loads, naming the file and the
    # complete checkpoint before it; going on from that one loses nothing
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    step6, step8 = damaged / "checkpoints" / "step-00000006", damaged / "checkpoints" / "step-00000008"
    cut = next(step8.glob("*zero_pp_rank_1_*optim_states.pt"))
    size = cut.stat().st_size
    os.truncate(cut, size - 1000)
    auto = train(resume_args(files, damaged) + ["--resume", "auto"], check=False)
    assert auto.returncode == 2 and (
        f"--resume auto: the newest complete checkpoint is damaged: {cut} is {size - 1000:,} bytes, the save wrote "
        f"{size:,} (cut short or changed since); restore the file, or go on from the complete checkpoint before it: "
        f"--resume {step6} (resuming from an earlier checkpoint of its run sets the later ones aside in "
        f"OUTPUT/abandoned/, step-00000008 with them)") in auto.stderr, auto.stderr[-3000:]
    changed = sorted(step6.rglob("*.pt"))[1]  # rank 1's share of the checksums (every other file)
    record = flip_a_byte(changed)
    explicit = train(resume_args(files, damaged) + ["--resume", str(step6)], check=False)
    assert explicit.returncode == 2 and (
        f"--resume {step6} is damaged: {changed}: its record {record} does not match its checksum (changed since "
        f"the save); restore the file, or go on from the complete checkpoint before it: --resume "
        f"{step6.parent / 'step-00000004'}") in explicit.stderr, explicit.stderr[-3000:]
    from export_checkpoint import main as export_checkpoint

    assert export_checkpoint([str(step8), str(tmp_path / "never")]) == 2 and not (tmp_path / "never").exists()
    from train.checkpoint import MARKER, damage

    marker = json.loads((step8 / MARKER).read_text())
    (step8 / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    assert damage(step8).startswith(f"{cut} is no readable torch file")  # older checkpoints: no sizes to compare
    train(resume_args(files, damaged) + ["--resume", str(step6.parent / "step-00000004")])
    assert [losses_by_step(damaged)[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]
    aside = next((damaged / "abandoned").iterdir())
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000006", "step-00000008"]
    assert (aside / "step-00000008" / cut.name).stat().st_size == size - 1000  # set aside as found


def assert_wandb_holds(out: Path) -> None:
    """The offline W&B runs in OUT/wandb, together, hold every value of OUT/metrics.jsonl at its step."""
    from test_train import wandb_history

    charted: dict[int, dict] = {}
    for run in range(len(list((out / "wandb").glob("offline-run-*")))):
        for at, row in wandb_history(out, run)[0].items():
            charted.setdefault(at, {}).update(row)
    for row in metrics(out):
        values = {k: v for k, v in row.items() if k != "step"}
        assert {k: charted.get(row["step"], {}).get(k) for k in values} == pytest.approx(values), row["step"]


def flip_a_byte(file: Path) -> str:
    """Changes one byte in the middle of the largest record of the torch (zip) `file`; its name."""
    import zipfile

    with zipfile.ZipFile(file) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    with open(file, "r+b") as f:
        f.seek(largest.header_offset + 26)  # the local header's name and extra field lengths
        name, extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(largest.header_offset + 30 + name + extra + largest.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return largest.filename


def test_a_run_resumed_on_other_ranks_reads_the_rest_of_the_epoch_with_the_optimizer_state(files, tmp_path):
    """A job preempted on 2 ranks goes on on 3 (and another micro batch): every sample of the
    epoch it resumes is read once (the ones no rank read yet, split afresh), the next epochs are
    whole, --epochs counts from there, and DeepSpeed's state carries over, re-partitioned through
    its universal checkpoint: with --lr 0 from there, the fp32 weights two steps later are the
    checkpoint's, Adam's moments and step count go on, and so do the BatchNorm buffers."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_pipelines import true_labels

    two, three = tmp_path / "two", tmp_path / "three"
    args = lambda out, micro: [*common(files, "photos", "resnet", out), "--ds_config", "ds_configs/zero2.json",
                               "--micro_batch_size", str(micro), "--log_steps", "1", "--save_steps", "2",
                               "--save_total_limit", "10", "--record_keys"]
    train(args(two, 6) + ["--max_steps", "4"])  # 3 steps an epoch: step 4 is one batch into epoch 2
    step4 = two / "checkpoints" / "step-00000004"
    # 3 ranks of 2: 6 steps an epoch; 4 to finish epoch 2 (24 samples left), 6 for epoch 3
    goes_on_args = args(three, 2) + ["--epochs", "3", "--lr", "0"]
    done = train(goes_on_args + ["--resume", str(step4)], ranks=3)
    assert "step-00000004 was saved by 2 rank(s): converting it to DeepSpeed's universal checkpoint for 3" in done.stdout
    assert ("ranks 2 -> 3; micro_batch_size 6 -> 2 (the samples of the epoch that no rank has read yet are split "
            "afresh)") in done.stdout, done.stdout
    assert "train: 14 steps (6 per epoch)" in done.stdout  # not 3 x 6 = 18: 4 steps were done at 12 images
    assert not (three / "checkpoints" / ".universal").exists()

    train_keys = set(true_labels(files["photos"], "train"))
    read = {rank: dict(keys_by_step(two, rank)) for rank in (0, 1)}
    goes_on = {rank: dict(keys_by_step(three, rank)) for rank in (0, 1, 2)}
    assert all(sorted(steps) == list(range(5, 15)) for steps in goes_on.values())
    epoch2 = [k for r in (0, 1) for k in read[r][4]] + [k for r in (0, 1, 2) for s in range(5, 9) for k in goes_on[r][s]]
    assert len(epoch2) == len(set(epoch2)) and set(epoch2) == train_keys  # 36: 12 before, 24 after
    epoch3 = [k for r in (0, 1, 2) for s in range(9, 15) for k in goes_on[r][s]]
    assert len(epoch3) == len(set(epoch3)) and set(epoch3) == train_keys
    epochs = {m["step"]: m["train/epoch"] for m in metrics(three) if "train/epoch" in m}
    assert [epochs[s] for s in range(5, 15)] == pytest.approx([1 + (12 + 6 * n) / 36 for n in range(1, 11)])
    # a later plain resume of this line counts --epochs from its loader too (14 steps, not 18)
    again = train(goes_on_args + ["--resume", str(three / "checkpoints" / "step-00000010")], ranks=3)
    assert "train: 14 steps (6 per epoch)" in again.stdout and "steps 14 ->" not in again.stdout, again.stdout
    assert sorted(losses_by_step(three)) == list(range(5, 15))
    # evals where this run's epochs end (steps 8 and 14), not at multiples of its 6 steps an epoch
    assert [m["step"] for m in metrics(three) if "eval/top1" in m] == [8, 14]

    def saved(out: Path, step: int) -> tuple[dict, dict, list]:
        folder = out / "checkpoints" / f"step-{step:08d}"
        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        module = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        ranks = [torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
                 for f in sorted(folder.glob("zero_pp_rank_*_optim_states.pt"))]
        groups = [{key: torch.cat([rank["state"][g][key].flatten() for rank in ranks]) for key in ("exp_avg_sq",)}
                  | {"step": {int(rank["state"][g]["step"]) for rank in ranks}} for g in range(len(ranks[0]["state"]))]
        return weights, module, groups

    weights4, module4, groups4 = saved(two, 4)
    weights6, module6, groups6 = saved(three, 6)
    assert weights6.keys() == weights4.keys()
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's: two forwards moved them
    for name in [name for name in weights4 if not name.endswith(buffers)]:
        assert torch.equal(weights6[name], weights4[name]), name  # lr 0: fp32 masters as loaded
    tracked = [name for name in module4 if name.endswith("num_batches_tracked")]
    assert tracked and all(int(module6[name]) == int(module4[name]) + 2 for name in tracked)
    beta2 = 0.999
    for before, after in zip(groups4, groups6, strict=True):
        assert before["step"] == {4} and after["step"] == {6}
        n = min(len(before["exp_avg_sq"]), len(after["exp_avg_sq"]))  # partitions padded differently
        assert (after["exp_avg_sq"][:n] >= beta2**2 * before["exp_avg_sq"][:n] * (1 - 1e-6)).all()
        assert before["exp_avg_sq"].sum() > 0


def test_an_epoch_that_ends_at_the_checkpoint_resumed_from_is_evaluated_there(files, tmp_path):
    """The eval of an epoch whose end the run never reached before it stopped: resumed on fewer
    ranks with a larger batch, what is left of the epoch fills no step, so the epoch ended at the
    checkpoint (saved by --save_steps, without an eval). The resumed run evaluates there first, the
    checkpoint records that eval's top-1, and a resume at a step already evaluated does not evaluate
    again (from another run's checkpoint, the run saves its own copy with it). The sample-key logs
    of the ranks the resumed run does not have are cut at its step too."""
    out = tmp_path / "run"
    args = lambda micro: [*common(files, "photos", "resnet", out), "--ds_config", "ds_configs/zero2.json",
                          "--micro_batch_size", str(micro), "--log_steps", "1", "--save_steps", "3",
                          "--save_total_limit", "10", "--epochs", "2", "--record_keys"]
    train(args(2) + ["--max_steps", "4"], ranks=3)  # 3 ranks x 2: 6 steps an epoch (36 images)
    step3 = out / "checkpoints" / "step-00000003"
    assert json.loads((step3 / "complete.json").read_text())["top1"] is None
    assert [m["step"] for m in evals(out)] == [4]
    # 2 ranks x 10 from step 3: 18 images of epoch 1 are left, fewer than a step: it ended at step 3
    done = train(args(10) + ["--resume", str(step3)])
    assert "train: 4 steps (1 per epoch)" in done.stdout, done.stdout
    at = {m["step"]: m for m in evals(out)}
    assert sorted(at) == [3, 4] and all(m["eval/samples_counted"] == 12 for m in at.values())
    assert json.loads((step3 / "complete.json").read_text())["top1"] == pytest.approx(at[3]["eval/top1"])
    assert [step for step, _ in keys_by_step(out, 2)] == [1, 2, 3]  # rank 2 trained step 4 of the line left
    assert [step for step, _ in keys_by_step(out, 0)] == [1, 2, 3, 4]
    # stopped again before its next save: resumed from step 3 once more, the eval is not made twice
    train(args(10) + ["--resume", str(step3)])
    assert [(m["step"], m["eval/top1"]) for m in evals(out)] == [(s, at[s]["eval/top1"]) for s in (3, 4)]
    # resumed where an eval was made and saved: none again
    train(args(10) + ["--resume", "auto", "--epochs", "3"])
    assert [m["step"] for m in evals(out)] == [3, 4, 5]
    # from another run's checkpoint: this run saves its own copy of step 3, with the eval's top-1
    elsewhere = tmp_path / "elsewhere"
    branch = args(10) + ["--resume", str(step3)]
    branch[branch.index("--output_dir") + 1] = str(elsewhere)
    train(branch)
    assert [(m["step"], m["eval/top1"]) for m in evals(elsewhere)] == [(s, at[s]["eval/top1"]) for s in (3, 4)]
    copy = json.loads((elsewhere / "checkpoints" / "step-00000003" / "complete.json").read_text())
    assert copy["top1"] == pytest.approx(at[3]["eval/top1"])


def test_a_run_resumed_from_an_epoch_end_with_a_smaller_batch_starts_the_next_epoch(files, tmp_path):
    """An epoch ends where what is left of it fills no step: 2 ranks x 2 x accumulation 2 read 32
    of the 36 images in 4 steps (each rank's last micro batch fills no step), evaluate and save.
    Resumed on one rank with batches of 2, those 4 images would make 2 more steps of an epoch that
    has ended and been evaluated (train/epoch going back, a second eval of epoch 1); the run goes
    on with epoch 2 instead, whole, its end evaluated."""
    from test_pipelines import true_labels

    out = tmp_path / "run"
    args = lambda micro, accum: [*common(files, "photos", "resnet", out), "--ds_config", "ds_configs/zero2.json",
                                 "--micro_batch_size", str(micro), "--grad_accum", str(accum), "--log_steps", "1",
                                 "--save_steps", "4", "--record_keys"]
    first = train(args(2, 2) + ["--epochs", "1"])
    assert "train: 4 steps (4 per epoch)" in first.stdout, first.stdout
    done = train(args(2, 1) + ["--epochs", "2", "--resume", "auto"], ranks=None)
    assert "train: 22 steps (18 per epoch)" in done.stdout, done.stdout
    assert [m["step"] for m in evals(out)] == [4, 22]
    epochs = {m["step"]: m["train/epoch"] for m in metrics(out) if "train/epoch" in m}
    assert epochs[4] == pytest.approx(1.0) and epochs[5] == pytest.approx(1 + 1 / 18)
    assert [epochs[s] for s in sorted(epochs)] == sorted(epochs.values())  # never back
    epoch2 = [key for step, keys in keys_by_step(out, 0) if step > 4 for key in keys]
    assert len(epoch2) == 36 and set(epoch2) == set(true_labels(files["photos"], "train"))


def test_a_resumed_run_applies_its_new_settings_and_sets_the_line_it_leaves_aside(files, tmp_path):
    """Going back to an earlier checkpoint with other settings (a loss spike: lower the lr, resume
    from before it) is a new line of the run: its settings apply from its first step, the data order
    goes on, and the later checkpoints of the line it leaves are moved out of the way, where
    --resume auto, the pruning and --export best would have taken them for its own."""
    import torch

    out = tmp_path / "run"
    train(resume_args(files, out) + ["--save_total_limit", "10"], env={"WANDB_MODE": "offline"})
    first_keys = {rank: keys_by_step(out, rank) for rank in (0, 1)}
    first_lrs = {m["step"]: m["train/lr"] for m in metrics(out) if "train/lr" in m}

    step4 = out / "checkpoints" / "step-00000004"
    branch = resume_args(files, out) + ["--resume", str(step4), "--lr", "3e-3", "--weight_decay", "0.1",
                                        "--color_jitter", "0.3", "--save_steps", "5", "--eval_steps", "5"]
    branch[branch.index("--max_steps") + 1] = "10"
    branch[branch.index("--ds_config") + 1] = "ds_configs/zero1.json"  # ZeRO-1 reads ZeRO-2's checkpoint
    done = train(branch, env={"WANDB_MODE": "offline"})
    assert ("this run's settings apply from step 5: zero_stage 2 -> 1; steps 8 -> 10; lr 0.001 -> 0.003; "
            "weight_decay 0.05 -> 0.1; color_jitter 0.0 -> 0.3 (the augmentation's random state starts afresh)"
            ) in done.stdout
    abandoned = next((out / "abandoned").iterdir())
    assert (f"moved 2 checkpoint(s) this run does not continue (step-00000006, step-00000008; it goes on from "
            f"{step4}), their metrics and export to {abandoned}") in done.stdout
    assert (abandoned / "model" / "model.safetensors").is_file() and (abandoned / "eval_results.json").is_file()
    assert [json.loads(line)["step"] for line in (abandoned / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line] == [5, 6, 7, 8]
    assert sorted(p.parent.name for p in abandoned.glob("*/complete.json")) == ["step-00000006", "step-00000008"]
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept[-2:] == ["step-00000005", "step-00000010"] and set(kept) <= {"step-00000004", *kept[-2:]}
    # the new lr and schedule from step 5 on (DeepSpeed alone restores the saved rates), the old before
    rows = {m["step"]: m for m in metrics(out) if "train/lr" in m}
    assert sorted(rows) == list(range(1, 11))
    assert [rows[s]["train/lr"] for s in range(1, 5)] == pytest.approx([first_lrs[s] for s in range(1, 5)])
    assert [rows[s]["train/lr"] for s in range(5, 11)] == pytest.approx(
        schedule_lrs("cosine", warmup=0, steps=10, lr=3e-3)[4:])
    saved = torch.load(out / "checkpoints" / "step-00000010" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert sorted(group["weight_decay"] for group in saved) == [0.0, 0.1]
    # a new augmentation graph cannot take DALI's checkpoint, yet the data order goes on where it was
    for rank in (0, 1):
        assert keys_by_step(out, rank)[:8] == first_keys[rank]
    # one W&B run per line: the branch is a new run from step 5 on (W&B would draw both lines' values
    # at steps 5-8 in one run), named for where it starts
    from test_train import wandb_history, wandb_records

    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len({f.parent.name.rsplit("-", 1)[-1] for f in run_files}) == 2
    assert sorted(wandb_history(out, 0)[0]) == list(range(1, 9))
    assert sorted(wandb_history(out, 1)[0]) == list(range(5, 11))
    names = [r.run.display_name for r in wandb_records(run_files[1]) if r.WhichOneof("record_type") == "run"]
    assert names and set(names) == {"run from step 4"}, names
    # its runs table columns hold the best eval of the line it goes on from (step 4's) from its start,
    # not from its first eval
    from train.metrics import history_row

    kinds = [(r.WhichOneof("record_type"), r) for r in wandb_records(run_files[1])]
    first_eval = next(i for i, (kind, r) in enumerate(kinds) if kind == "history" and "eval/top1" in history_row(r))
    first_best = next(i for i, (kind, r) in enumerate(kinds)
                      if kind == "summary" and any(u.key == "eval/best_top1" for u in r.summary.update))
    line_best = max((e["eval/top1"], e["step"]) for e in evals(out) if e["step"] <= 4)
    assert first_best < first_eval and {u.key: json.loads(u.value_json) for u in kinds[first_best][1].summary.update
                                        } == {"eval/best_top1": line_best[0], "eval/best_step": line_best[1]}
    state = torch.load(out / "checkpoints" / "step-00000010" / "trainer_state_rank0.pt", weights_only=False)
    assert (state["wandb_run_id"], state["wandb_run_name"]) == (run_files[1].parent.name.rsplit("-", 1)[-1],
                                                                "run from step 4")  # a later resume goes on in it
    # the best among equal evals is the newest, in the summary as in the export
    best = max(evals(out), key=lambda e: (e["eval/top1"], e["step"]))
    assert (f"best eval top-1 {best['eval/top1']:.2%} at step {best['step']}" in done.stdout
            and f"(from step-{best['step']:08d}, the best by eval top-1)" in done.stdout)

    # what DeepSpeed's checkpoint cannot follow is refused, each with what to do; so is a checkpoint
    # past the run's last step (--max_steps 8 from step 10), which would train nothing
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["optimizer"]["type"] = "Adam"
    (tmp_path / "adam3.json").write_text(json.dumps(config))
    other = resume_args(files, out) + ["--resume", "auto", "--ds_config", str(tmp_path / "adam3.json")]
    other[other.index("--precision") + 1] = "bf16"
    refused = train(other, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    for expected in ("saved by a fp32 run, this one is bf16; resume with --precision fp32",
                     "saved under ZeRO-1, this run's --ds_config has ZeRO-3; resume with a ZeRO-1 config",
                     "saved with the optimizer AdamW, this run's --ds_config has Adam; resume with AdamW",
                     "saved at step 10, past this run's last step 8; the steps count from the start of the run "
                     "(--max_steps 18 trains 8 more)"):
        assert expected in refused.stderr, refused.stderr[-3000:]

    # --export best passes over an earlier checkpoint damaged since for the next best, and says so
    step5 = out / "checkpoints" / "step-00000005"
    marker = json.loads((step5 / "complete.json").read_text())
    (step5 / "complete.json").write_text(json.dumps({**marker, "top1": 1.0}))  # the best of all
    flip_a_byte(step5 / "mp_rank_00_model_states.pt")
    on = [a if a != str(step4) else "auto" for a in branch]
    on[on.index("--max_steps") + 1] = "12"
    done = train(on)
    scores = {p.parent.name: json.loads(p.read_text())["top1"] for p in (out / "checkpoints").glob("*/complete.json")}
    assert sorted(scores)[0] == step5.name and sorted(scores)[-1] == "step-00000012"  # the pruning keeps the best
    best = max((top1, name) for name, top1 in scores.items() if name != step5.name)[1]
    assert (f"(from {best}, the best by eval top-1; passed over {step5.name}, damaged: "
            f"{step5 / 'mp_rank_00_model_states.pt'}: its record ") in done.stdout, done.stdout[-2000:]
    exported = load_file(out / "model" / "model.safetensors")
    straight = torch.load(out / "checkpoints" / best / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    shared = [k for k in exported if k in straight]
    assert shared and all(torch.equal(exported[k], straight[k].float()) for k in shared)


def test_a_run_that_goes_back_to_end_at_an_earlier_checkpoint_writes_that_steps_final_eval(files, tmp_path):
    """Going back to an earlier checkpoint with --max_steps at its step (the run kept as it was there,
    before a loss spike) trains nothing. The final eval's files of the line it leaves are moved aside
    with that line; the run writes those of its own last step (once: its eval there is logged
    already), which the output dir would otherwise lack. Found by the soak (seed 4100, trial 3)."""
    out = tmp_path / "run"
    train(resume_args(files, out) + ["--save_total_limit", "10"])
    step4 = out / "checkpoints" / "step-00000004"
    back = resume_args(files, out) + ["--resume", str(step4)]
    back[back.index("--max_steps") + 1] = "4"
    done = train(back)
    abandoned = next((out / "abandoned").iterdir())
    assert json.loads((abandoned / "eval_results.json").read_text())["step"] == 8
    results = json.loads((out / "eval_results.json").read_text())
    assert (results["step"], results["samples"]) == (4, 12), results
    logged = [e for e in evals(out) if e["step"] == 4]
    assert len(logged) == 1 and logged[0]["eval/top1"] == pytest.approx(results["top1"]), evals(out)
    assert f"final eval:  {out / 'eval_results.json'}" in done.stdout and "done, 0 steps" in done.stdout


def schedule_lrs(name: str, *, warmup: int, steps: int, lr: float = 1e-3) -> list[float]:
    """The learning rate of each of `steps` steps under transformers' schedule `name`."""
    import torch
    from transformers import get_scheduler

    schedule = get_scheduler(name, torch.optim.SGD([torch.zeros(1)], lr=lr), num_warmup_steps=warmup,
                             num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return rates


def test_non_finite_loss_is_skipped_on_every_rank_and_counted(files, tmp_path):
    out = tmp_path / "run"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "6",
           "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "3"],
          env={"TRAIN_NAN_AT": "1:2,3", "WANDB_MODE": ""})  # an empty variable is unset: W&B offline by default
    rows = {m["step"]: m for m in metrics(out) if "train/skipped_steps" in m}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 2, 2, 2, 2]
    assert [s for s in range(1, 7) if "train/loss" not in rows[s]] == [2, 3]
    # the schedule follows the step count, skipped steps included: it ends where it should
    assert [rows[s]["train/lr"] for s in range(1, 7)] == pytest.approx(schedule_lrs("cosine", warmup=0, steps=6))
    assert list((out / "wandb").glob("offline-run-*"))
    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())


def test_fp16_overflow_steps_are_counted_and_the_schedule_follows_the_step_count(files, tmp_path):
    """fp16 with a loss scale far too high: DeepSpeed skips the first steps' updates (non-finite
    gradients) and halves the scale each time. Each such step is counted once per optimizer step
    (accumulation 2), shown with its loss scale, moves the schedule on like any other, and is not a
    bad step for --max_bad_steps; resumed from a step among the overflows, the run goes on as if
    never stopped. DeepSpeed's CPU accelerator offers fp16 only on CPUs with fp16 instructions, while
    torch computes fp16 on any CPU: the launched ranks open that gate, so that the real loss scaler
    runs here."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
                                           "CPU_Accelerator.is_fp16_supported = lambda self: True\n")
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["fp16"].update(initial_scale_power=20, hysteresis=1)  # each overflow halves the scale
    (tmp_path / "fp16.json").write_text(json.dumps(config))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    def fp16_run(out: Path, *extra: str) -> list[dict]:
        args = [*common(files, "photos", "vit", out), "--max_steps", "10", "--micro_batch_size", "3", "--grad_accum",
                "2", "--log_steps", "1", "--warmup_steps", "2", "--lr_scheduler", "linear", "--max_bad_steps", "2",
                "--save_steps", "2", "--save_total_limit", "10", "--eval_steps", "10", *extra]
        args[args.index("--precision") + 1] = "fp16"
        train(["--ds_config", str(tmp_path / "fp16.json"), *args], env=env)
        return [m for m in metrics(out) if "train/lr" in m]

    out = tmp_path / "run"
    rows = fp16_run(out)
    assert [m["step"] for m in rows] == list(range(1, 11))
    overflows = [0] + [m["train/overflow_steps"] for m in rows]
    overflowed = [after - before for before, after in zip(overflows, overflows[1:])]
    assert set(overflowed) <= {0, 1} and overflowed[:3] == [1, 1, 1] and 0 in overflowed, overflowed
    # the count is the scaler's: the scale halved at exactly those steps, whose gradients were not finite
    assert [m["train/loss_scale"] for m in rows] == [2.0**20 / 2**n for n in overflows[1:]]
    assert [math.isinf(m["train/grad_norm"]) for m in rows] == [bool(o) for o in overflowed]
    assert all(m["train/skipped_steps"] == 0 and math.isfinite(m["train/loss"]) for m in rows)
    assert [m["train/lr"] for m in rows] == pytest.approx(schedule_lrs("linear", warmup=2, steps=10))
    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())
    # resumed at step 2, two overflows in: the count, the scale and the schedule come back with the checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for later in (4, 6, 8, 10):
        shutil.rmtree(resumed / "checkpoints" / f"step-{later:08d}")
    def trained(rows: list[dict]) -> list[dict]:  # the train/ figures (perf/ are timings)
        return [{k: v for k, v in m.items() if k == "step" or k.startswith("train/")} for m in rows]

    assert trained(fp16_run(resumed, "--resume", "auto")) == trained(rows)


@pytest.mark.parametrize("accum, zero", [(2, "zero2"), (3, "zero3")])
def test_non_finite_micro_batches_with_accumulation_on_every_zero_stage(files, tmp_path, accum, zero):
    """NaN on rank 1 in the last micro batch of step 2 (the step goes on with the others), in the
    first of step 3 (likewise), and in all of step 4 (skipped): DeepSpeed neither crashes nor
    applies NaN; the steps count as they should."""
    out = tmp_path / "run"
    train(["--ds_config", f"ds_configs/{zero}.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
           "--micro_batch_size", "4", "--grad_accum", str(accum), "--log_steps", "1", "--save_steps", "5",
           "--eval_steps", "5"], env={"TRAIN_NAN_AT": f"1:2.{accum},3.1,4"})
    rows = {m["step"]: m for m in metrics(out) if "train/skipped_steps" in m}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 0, 0, 1, 1]
    assert [s for s in range(1, 6) if "train/loss" not in rows[s]] == [4]
    assert all(math.isfinite(rows[s]["train/loss"]) for s in (1, 2, 3, 5))
    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())
    assert evals(out)[-1]["eval/samples_counted"] == 12


def test_too_many_non_finite_steps_stop_the_run_with_checkpoints_intact(files, tmp_path):
    out = tmp_path / "run"
    done = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "8",
                  "--micro_batch_size", "6", "--save_steps", "2", "--max_bad_steps", "3"],
                 env={"TRAIN_NAN_AT": "0:4,5,6"}, check=False)
    assert done.returncode != 0
    assert "3 consecutive steps (to step 6) had a non-finite loss" in done.stderr
    checkpoints = out / "checkpoints"
    assert f"the newest complete checkpoint, {checkpoints / 'step-00000004'}, is intact" in done.stderr
    # saves every 2 steps and at the step-3 eval (a new best); the newest two kept, none past step 4
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert all((checkpoints / name / "complete.json").is_file() for name in ("step-00000003", "step-00000004"))


PADDING_CHECK = """
import os, sys
root, out = sys.argv[-2:]  # after the launcher's --local_rank
sys.path.insert(0, root)
import deepspeed, torch
from deepspeed import comm as dist
from train.checkpoint import weights_are_finite
from train.config import resolve_optimizer
from train.distributed import no_shm_op

no_shm_op()  # as the trainer's CPU ranks: no op to compile
deepspeed.init_distributed(verbose=False)
rank, world = dist.get_rank(), dist.get_world_size()
model = torch.nn.Linear(5, 4)  # 20 + 4 elements: ZeRO-3 pads each to a multiple of 3 ranks
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
resolve_optimizer(config, device_type="cpu")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
padding = 0
for p in engine.module.parameters():
    own = max(0, min(p.ds_tensor.numel(), p.ds_numel - p.ds_tensor.numel() * rank))
    p.ds_tensor[own:] = float("nan")
    padding += p.ds_tensor.numel() - own
total = torch.tensor([padding])
dist.all_reduce(total)
with_nan_padding = weights_are_finite(engine)
if rank == world - 1:
    engine.module.weight.ds_tensor[0] = float("nan")
said = f"padding {int(total)}, finite {with_nan_padding}, then {weights_are_finite(engine)}"
with open(f"{out}/rank{rank}.txt", "w") as f:  # the ranks' prints would interleave
    f.write(said)
dist.barrier()
os._exit(0)  # past the interpreter's teardown of DeepSpeed's and gloo's threads
"""


def test_zero3_padding_is_no_weight_and_a_non_finite_weight_stops_the_run_cleanly(files, tmp_path):
    """ZeRO-3 pads each parameter to equal partitions and leaves the padding uninitialized: any
    bits, NaN's too (seen: a bf16 ViT on 3 ranks refused its first checkpoint, "the weights are not
    finite", while its evals were fine). The check before a save reads each rank's own elements;
    a non-finite weight still stops the run, with one message and the checkpoints before it intact."""
    script = tmp_path / "padding_check.py"
    script.write_text(PADDING_CHECK)
    done = subprocess.run(launcher(ranks=3)[:-1] + [str(script), str(ROOT), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    assert said == ["padding 3, finite True, then False"] * 3

    out = tmp_path / "run"  # 3 ranks of 6 photos: 2 steps an epoch; NaN padding before every save
    stopped = train(["--ds_config", "ds_configs/zero3.json", *common(files, "photos", "resnet", out),
                     "--micro_batch_size", "6", "--max_steps", "6"], ranks=3,
                    env={"TRAIN_NAN_PADDING": "1", "TRAIN_NAN_WEIGHT_AT_STEP": "4"}, check=False)
    assert stopped.returncode == 4, stopped.stderr[-3000:]
    assert (f"train: stopped: step 4: the weights are not finite; not saving {out / 'checkpoints' / 'step-00000004'}"
            in stopped.stderr), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert [p.parent.name for p in (out / "checkpoints").glob("step-*/complete.json")] == ["step-00000002"]
    assert not (out / "checkpoints" / "step-00000004").exists()


def test_nan_guard_stop_trains_the_same_without_syncs_and_stops_at_the_next_check(files, tmp_path):
    """--nan_guard stop checks losses only at logs, evals and saves: NaN on rank 1 at step 5 (not a
    check step) is found at step 6, before its checkpoint; until then it trains as skip does."""
    args = lambda out: ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out),
                        "--micro_batch_size", "6", "--save_steps", "2", "--log_steps", "3", "--eval_steps", "100",
                        "--lr_scheduler", "constant", "--warmup_steps", "0"]  # the same rates whatever --max_steps
    skip, stop = tmp_path / "skip", tmp_path / "stop"
    train(args(skip) + ["--max_steps", "3"])
    done = train(args(stop) + ["--max_steps", "8", "--nan_guard", "stop"], env={"TRAIN_NAN_AT": "1:5"}, check=False)
    assert done.returncode == 4, done.stderr
    assert "not finite on some rank between steps 5 and 6 (--nan_guard stop)" in done.stderr
    assert sorted(p.name for p in (stop / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert [m["step"] for m in metrics(stop) if "train/loss" in m] == [3]
    assert losses_by_step(stop)[3] == pytest.approx(losses_by_step(skip)[3], rel=1e-6)
    # a NaN before the first save, in a step that logs: the message names the step and that
    # nothing is left to go on from
    done = train(args(tmp_path / "first") + ["--max_steps", "3", "--nan_guard", "stop", "--log_steps", "1"],
                 ranks=None, env={"TRAIN_NAN_AT": "0:1"}, check=False)
    assert done.returncode == 4, done.stderr
    assert "not finite on some rank at step 1 (--nan_guard stop)" in done.stderr
    assert f"no checkpoint was saved in {tmp_path / 'first' / 'checkpoints'} (--resume auto starts over)" in done.stderr


def copy_shards(files, tmp_path: Path) -> Path:
    data = tmp_path / "shards"
    shutil.copytree(files["photos"], data)
    return data


def test_modified_or_truncated_shard_is_caught_before_step_0(files, tmp_path):
    data = copy_shards(files, tmp_path)
    shard = data / "train" / "shard-000001.tar"  # hashed by rank 1 of 2: its finding reaches rank 0
    with open(shard, "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "run"),
            "--data", str(data), "--max_steps", "2", "--micro_batch_size", "6"]
    done = train(args, check=False)
    assert done.returncode == 2 and f"{shard}: sha256 differs from the manifest" in done.stderr
    assert not (tmp_path / "run").exists()

    shutil.copy(files["photos"] / "train" / "shard-000001.tar", shard)
    truncated = data / "val" / "shard-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:-1024])
    done = train(args, ranks=None, check=False)
    assert done.returncode == 2 and f"{truncated}: " in done.stderr and "(truncated or modified)" in done.stderr


def test_undecodable_sample_mid_run_names_shard_and_key_and_stops_every_node(files, tmp_path):
    """Two nodes on one machine, a zeroed JPEG in rank 1's (node 1's) step 3: rank 1 names the shard
    and the key, rank 0 on the other node stops promptly saying why, both exit 3, checkpoints of
    steps 1 and 2 stay complete."""
    data = copy_shards(files, tmp_path)
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "probe"),
            "--data", str(data), "--max_steps", "3", "--micro_batch_size", "6", "--record_keys", "--save_steps", "1"]
    train(args)
    (step, keys), = [(s, k) for s, k in keys_by_step(tmp_path / "probe", 1) if s == 3]
    shard = break_sample(data / "train", keys[0])

    out = tmp_path / "run"
    args[args.index("--output_dir") + 1] = str(out)
    start = time.monotonic()
    nodes = two_nodes(args, tmp_path=tmp_path)
    logs = [finish(node, timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [3, 3], logs
    assert "rank 1: data error at step 3" in logs[1] and f"shard {shard}, sample {keys[0]}" in logs[1]
    assert "rank 0: stopping: rank 1 had a data error at step 3" in logs[0]
    assert "Traceback" not in logs[0] + logs[1]
    assert time.monotonic() - start < 120
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert all((p / "complete.json").is_file() for p in checkpoints.glob("step-*"))
    assert f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact" in logs[1]


def test_a_rank_that_fails_unexpectedly_stops_its_peers_and_the_job_exits_1(files, tmp_path):
    """An unexpected error on one rank of 3 (a bug, a device fault; TRAIN_FAIL_AT) in step 3: the
    rank posts it in the store, its peers stop within seconds saying why (one traceback, rank 2's)
    instead of waiting in a collective until the backend's timeout, the job exits 1 (the rank's own
    code, whatever its threads do at exit), and the checkpoint of step 2 is complete."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
            "--micro_batch_size", "4", "--save_steps", "2", "--eval_steps", "100"]
    start = time.monotonic()
    done = train(args, ranks=3, env={"TRAIN_FAIL_AT": "2:3"}, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "rank 2: failed at step 3 (the traceback follows)" in done.stderr, done.stderr[-3000:]
    assert "RuntimeError: injected failure (TRAIN_FAIL_AT=2:3)" in done.stderr
    # each peer says why it stops, whether its watcher saw the post first or its collective lost rank 2
    for rank in (0, 1):
        assert f"rank {rank}: stopping: rank 2 failed at step 3: RuntimeError: injected failure" in done.stderr, \
            done.stderr[-5000:]
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr[-5000:]
    # no abort, and no store call met rank 0 gone (it leaves last)
    assert "terminate called" not in done.stderr and "failed on SocketImpl" not in done.stderr
    assert time.monotonic() - start < 120
    assert shm_left(done) == []  # the ranks their watcher stopped (os._exit) removed theirs too
    checkpoints = out / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]
    assert f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact" in done.stderr


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_outright_is_named_by_its_peers(files, tmp_path, killed):
    """A rank killed outright in step 3 (SIGKILL, as the OOM killer does; TRAIN_FAIL_AT=K:3:kill)
    says nothing itself: its peers' collectives lose it. The first of them to notice finds it
    among its node's ranks and says which died and how, for every rank to repeat, instead of
    blaming itself with the collective's traceback; when the rank killed is 0, which hosts the
    store, each survivor on its node finds it so (the lowest names the checkpoint, whether its
    collective or its watcher lost the store first). The job fails (the launcher exits with the first failed exit
    it polls: the killed rank's, 256 - 9, or a survivor's 1) and the checkpoint of step 2 is
    complete."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
            "--micro_batch_size", "4", "--save_steps", "2", "--eval_steps", "100"]
    done = train(args, ranks=3, env={"TRAIN_FAIL_AT": f"{killed}:3:kill", "WANDB_MODE": "offline"}, check=False)
    assert done.returncode in (256 - signal.SIGKILL, 1), done.stderr[-3000:]
    # (a survivor's watcher may find rank 0's store gone before its collective fails: "lost contact")
    died = re.compile(rf"rank (\d): stopping: (lost contact with rank 0: )?rank {killed}'s process \(pid \d+\) "
                      rf"(was killed by SIGKILL|has ended)")
    assert sorted(m.group(1) for m in died.finditer(done.stderr)) == [str(r) for r in {0, 1, 2} - {killed}], \
        done.stderr[-5000:]
    assert "out of memory? the kernel's OOM killer sends SIGKILL" in done.stderr or "has ended" in done.stderr
    # the launcher's SIGTERM to every process left (rank 0's W&B service too) cut no one's way out short
    assert "failed at step" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-5000:]
    assert "terminate called" not in done.stderr
    assert shm_left(done) == []  # the killed rank's too: its node's ranks removed it
    checkpoints = out / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]
    # once: by the first to fail, or, rank 0 killed, by the lowest survivor of its node
    assert done.stderr.count(f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact") == 1
    if killed:  # the store's host outlives the others
        assert "failed on SocketImpl" not in done.stderr


def test_rank_0_killed_under_torchrun_is_named_by_its_peers(files, tmp_path):
    """Under torchrun the job's store lives in the launcher's agent, not in rank 0: with rank 0
    killed outright (SIGKILL in step 3) the survivors still name it, though the agent signals them
    within 0.1 s (a rank on its way out after an error holds SIGTERM: before, one sometimes said it
    was stopped by SIGTERM with nothing saved); the checkpoint of step 2 is said to be intact once,
    and the agent exits 1."""
    out = tmp_path / "run"
    job = subprocess.Popen(launcher(ranks=3, via="torchrun") + [
        "--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
        "--micro_batch_size", "4", "--save_steps", "2", "--eval_steps", "100"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "TRAIN_FAIL_AT": "0:3:kill"}, cwd=ROOT)
    try:
        output = finish(job, timeout=300)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1, output[-3000:]
    # (a survivor that looks after the agent reaped rank 0 finds it ended, not how; "at step N" is where
    # the survivor is: 3, or 2 for one still in step 2's hooks, after the save, when rank 0 died in step 3)
    died = re.findall(r"rank (\d): stopping: rank 0's process \(pid \d+\) (?:was killed by SIGKILL|has ended) at "
                      r"step [23]\b", output)
    assert sorted(died) == ["1", "2"], output[-5000:]
    assert "stopped by SIGTERM" not in output
    checkpoints = out / "checkpoints"
    assert output.count(f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact") == 1
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]

def test_a_rank_killed_while_its_peers_wait_without_an_error_is_named_by_their_watchers(files, tmp_path):
    """Rank 1 is killed outright in step 3 while ranks 0 and 2 wait in that step without an error
    coming (TRAIN_FAIL_AT=R:3:hang): as collectives wait under NCCL for a peer that died, GPUs of a
    node talking through memory, until the backend's timeout (10 to 30 minutes). Their watchers
    find rank 1 ended (not closed: `PeerWatch.close`) among their node's ranks, and the first posts
    it as a failure: both say which rank died and stop, the job ends within seconds, and the
    checkpoint of step 2 is named once."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
            "--micro_batch_size", "4", "--save_steps", "2", "--eval_steps", "100"]
    start = time.monotonic()
    done = train(args, ranks=3, env={"TRAIN_FAIL_AT": "1:3:kill,0:3:hang,2:3:hang"}, check=False)
    assert done.returncode in (256 - signal.SIGKILL, 1), done.stderr[-3000:]
    # (the launcher reaps the killed rank within a second: its wait status may be gone by then)
    died = re.compile(r"rank (\d): stopping: rank 1's process \(pid \d+\) (was killed by SIGKILL|has ended) at step 3")
    assert sorted(m.group(1) for m in died.finditer(done.stderr)) == ["0", "2"], done.stderr[-5000:]
    assert "(here then" not in done.stderr  # the second says nothing new: no echo of the first's line
    assert "injected timeout" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-5000:]
    assert time.monotonic() - start < 150  # far from the 10-minute wait
    assert shm_left(done) == []
    checkpoints = out / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]
    assert done.stderr.count(f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact") == 1


NODE = """
import os, socket, subprocess, sys
RANK = '''
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from train.distributed import PeerWatch

rank, how = int(os.environ["RANK"]), sys.argv[2]
store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, rank == 0)
peers = PeerWatch(rank=rank, store=store, world=2, silent_s=2)
peers.where = lambda: "at step 7"
store.set(f"watching {rank}", "")
store.wait(["watching 0", "watching 1"])  # each knows the other
if rank == 1:  # done, with every rank (closed), killed outright, or frozen
    {"closed": peers.close, "killed": lambda: os.kill(os.getpid(), signal.SIGKILL),
     "frozen": lambda: os.kill(os.getpid(), signal.SIGSTOP)}[how]()
    sys.exit(0)
time.sleep(4)  # rank 0 meanwhile waits in a collective that no error ends
print("rank 0 went on", flush=True)
peers.close()
'''
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
ranks = [subprocess.Popen([sys.executable, "-c", RANK, *sys.argv[1:]], env={**env, "RANK": str(r)}) for r in (0, 1)]
if sys.argv[2] == "frozen":
    code = ranks[0].wait()
    ranks[1].kill()
else:
    ranks[1].wait()  # reaped at once, as a launcher that polls its ranks may: no wait status is left to read
    code = ranks[0].wait()
print(f"rank 0 exited with {code}", flush=True)
"""


@pytest.mark.parametrize("how", ["closed", "killed", "frozen"])
def test_a_rank_of_the_node_that_ends_without_closing_stops_the_others(tmp_path, how):
    """The watcher of a rank waiting in a collective that no error ends (NCCL) finds a rank of its
    node (a child of its launcher) that ended without closing its PeerWatch, killed outright, and
    stops the job for it within its poll; rank 0 stops it for a rank it has not heard from for
    `silent_s` (2 s here), frozen (or on a node that went down). A rank that closed (finished with
    every rank, or stopped together on an agreed error) is neither dead nor unheard, however soon
    its launcher reaps it."""
    script = tmp_path / "node.py"
    script.write_text(NODE)
    done = subprocess.run([sys.executable, str(script), str(ROOT), how], capture_output=True, text=True, timeout=60)
    if how == "closed":
        assert done.stdout.splitlines() == ["rank 0 went on", "rank 0 exited with 0"], done.stdout + done.stderr
        assert "stopping" not in done.stderr, done.stderr[-3000:]
    else:
        assert done.stdout.splitlines() == ["rank 0 exited with 1"], done.stdout + done.stderr
        said = [line for line in done.stderr.splitlines() if line.startswith("train:")]
        expected = {"killed": r"rank 1's process \(pid \d+\) has ended at step 7",
                    "frozen": r"rank 1 \(on [^)]+\) not heard from for 2 s at step 7: ended, frozen, or its node is "
                              r"down \(killed by the OOM killer\? that node's log and `dmesg` say\)"}[how]
        assert len(said) == 1 and re.fullmatch(f"train: rank 0: stopping: {expected}", said[0]), done.stderr[-3000:]


FROZEN_STORE = """
import os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from train.distributed import PeerWatch

server = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d; "
                           "s = d.TCPStore('127.0.0.1', 0, 2, True, wait_for_workers=False); print(s.port, flush=True); "
                           "time.sleep(300)"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = int(server.stdout.readline())
print(f"store {server.pid}", flush=True)  # (the test ends it: it holds none of this process's output)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="1")
peers = PeerWatch(rank=1, store=dist.TCPStore("127.0.0.1", port, is_master=False), world=2, silent_s=2)
peers.where = lambda: "at step 7"
time.sleep(1.5)
os.kill(server.pid, signal.SIGSTOP)  # rank 0, which hosts the store, froze (or its node went down)
time.sleep(30)  # this rank waits in a collective meanwhile, no error coming
print("rank 1 went on", flush=True)
"""


def test_a_rank_whose_store_stops_answering_stops_with_a_line(tmp_path):
    """Rank 0 (the store's host) frozen, or its node down: its sockets do not close, so no store call
    fails, and a TCPStore client's timeout does not bound them. A rank waiting in a collective then
    ends once a call of its PeerWatch has not come back for `silent_s` (--peer_timeout), saying why,
    instead of waiting for ever."""
    script = tmp_path / "frozen_store.py"
    script.write_text(FROZEN_STORE)
    start = time.monotonic()
    rank = subprocess.Popen([sys.executable, str(script), str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    server = int(rank.stdout.readline().split()[1])
    try:
        out, err = rank.communicate(timeout=60)
    finally:
        os.kill(server, signal.SIGKILL)
    assert rank.returncode == 1 and "went on" not in out, out + err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("train:")]
    assert said == ["train: rank 1: stopping: lost contact with rank 0: the job's store (on 127.0.0.1) has not "
                    "answered for 2 s at step 7: rank 0 froze, or its node is down"], err[-3000:]
    assert time.monotonic() - start < 25


def test_a_rank_killed_alone_on_its_node_is_named_by_the_roll_call(files, tmp_path):
    """Two nodes of one rank each; rank 1 (node 1) is killed outright in step 3 and no rank of its
    node is left to find it. Rank 0's collective fails; it is the first to fail, and before it
    blames itself it waits for every other rank to answer its post (PeerWatch.silent): rank 1's
    silence is named next to the traceback, and node 1's launcher exits with its SIGKILL."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
            "--micro_batch_size", "6", "--save_steps", "2", "--eval_steps", "100"]
    nodes = two_nodes(args, tmp_path=tmp_path, env={"TRAIN_FAIL_AT": "1:3:kill"})
    logs = [finish(node, timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 256 - signal.SIGKILL], logs
    assert re.search(r"rank 0: failed at step 3 \(the traceback follows\); rank 1 did not answer within 2.5 s: its "
                     r"process ended or hangs, on another node \(killed by the OOM killer\?", logs[0]), logs[0][-3000:]
    assert logs[0].count("Traceback (most recent call last)") == 1 and "Traceback" not in logs[1]
    checkpoints = out / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]


def test_a_rank_killed_alone_on_its_node_while_the_others_wait_is_named_once_unheard(files, tmp_path):
    """Two nodes of one rank each; rank 1 (node 1) is killed outright in step 3 while rank 0 waits
    in that step without an error (TRAIN_FAIL_AT=0:3:hang, as under NCCL): no rank of node 1 is
    left to find it, no collective fails, and node 1's launcher tells no other node. Each watcher
    beats in the store once a second; rank 0 hears no more of rank 1 and, --peer_timeout later,
    stops the job naming it and its node, with the checkpoint to go on from."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
            "--micro_batch_size", "6", "--save_steps", "2", "--eval_steps", "100", "--peer_timeout", "10"]
    start = time.monotonic()
    nodes = two_nodes(args, tmp_path=tmp_path, env={"TRAIN_FAIL_AT": "1:3:kill,0:3:hang"})
    logs = [finish(node, timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 256 - signal.SIGKILL], logs
    assert re.search(r"train: rank 0: stopping: rank 1 \(on [^)]+\) not heard from for 10 s at step 3: ended, frozen, "
                     r"or its node is down \(killed by the OOM killer\?", logs[0]), logs[0][-3000:]
    assert "Traceback" not in logs[0] + logs[1] and "injected timeout" not in logs[0], logs[0][-3000:]
    assert time.monotonic() - start < 200  # far from the 10-minute wait
    checkpoints = out / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("step-*/complete.json")] == ["step-00000002"]
    assert f"the newest complete checkpoint, {checkpoints / 'step-00000002'}, is intact" in logs[0]


WAITING_RANK = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from train import distributed
from train.distributed import PeerWatch, watch_sigterm

distributed.SIGTERM_GRACE_S = 0.5  # a SIGTERM that got through would end the rank (143) 0.5 s after it
PeerWatch.LINGER_S = 2.0
watch_sigterm()
store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
peers = PeerWatch(rank=0, store=store, world=2)  # rank 1, on another node, died: it never counts out
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the launcher, seeing a rank exit
start = time.monotonic()
peers.stop_all(1, "rank 0 failed at step 3: RuntimeError: a peer's connection closed")
peers.leave()
print(f"left after {time.monotonic() - start:.1f} s", flush=True)
sys.exit(1)
"""


def test_a_stopping_rank_waits_for_its_peers_whatever_the_launcher_sends(tmp_path):
    """A rank that stops on a failure counts itself out and waits for the others (PeerWatch.LINGER_S
    at most) so that none exits before all have read why and closed their W&B run, the store's
    host last. The launcher SIGTERMs every rank as soon as one exits (and SIGKILLs 30 s later):
    that SIGTERM cuts neither the cleanup nor the wait short, and a peer that never counts out (it
    died on another node) holds the rank LINGER_S, no more; it exits with its own code."""
    script = tmp_path / "waiting_rank.py"
    script.write_text(WAITING_RANK)
    done = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert 2.0 <= float(re.search(r"left after ([\d.]+) s", done.stdout).group(1)) < 3.5


LEAVING_RANK = """
import datetime, os, signal, sys, time
root, server, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, root)
import torch.distributed as dist
from train.distributed import PeerWatch

store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=2))
peers = PeerWatch(rank=1, store=store, poll_s=0.01)
time.sleep(0.3)
os.kill(server, signal.SIGSTOP)  # rank 0's store stops answering: the watcher's call waits for it
time.sleep(0.3)
print("store stopped", flush=True)  # the test lets it answer a second later
peers.close()
print(f"watcher alive after close: {peers.thread.is_alive()}", flush=True)


class Teardown:  # what a rank tears down at exit (a model, DeepSpeed, DALI) outlasts the store's silence
    sleep = time.sleep

    def __del__(self):
        self.sleep(3)


held = Teardown()
sys.exit(2)
"""


def test_a_rank_leaves_with_its_exit_code_while_its_peer_watch_waits_on_the_store(tmp_path):
    """A rank that ends (an agreed config error, a failure) closes its PeerWatch and exits. Its
    watcher may be inside a store call then; a daemon thread that comes back from torch's C++ while
    the interpreter shuts down aborts the process ("terminate called without an active exception",
    exit 250 through the launcher: seen in CI for an explicit --resume of an incomplete checkpoint).
    close() waits for the call in flight, so the rank exits with its own code."""
    server = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d; "
                               "s = d.TCPStore('127.0.0.1', 0, 2, True, wait_for_workers=False); print(s.port, flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        script = tmp_path / "leaving_rank.py"
        script.write_text(LEAVING_RANK)
        rank = subprocess.Popen([sys.executable, str(script), str(ROOT), str(server.pid), str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rank.stdout.readline() == "store stopped\n"
        time.sleep(1)  # the rank is closing (or, without the wait, already tearing down)
        os.kill(server.pid, signal.SIGCONT)
        out, err = rank.communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    assert "watcher alive after close: False" in out, out + err[-3000:]
    assert rank.returncode == 2 and "terminate called" not in err, err[-3000:]


ENDING_RANK = """
import atexit, datetime, sys, threading, time
root, how = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import torch.distributed as dist
from train.distributed import exit_rank

store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=1))
# a library's daemon thread inside torch's C++ as the rank ends: its call comes back a second later
threading.Thread(target=store.wait, args=(["never set"],), daemon=True).start()
time.sleep(0.1)
atexit.register(print, "atexit ran", flush=True)
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # its idle worker is not a daemon: exit tells it to stop, then joins it
pool.submit(print, "pool ran", flush=True).result()


class Teardown:  # what a rank tears down at exit (a model, DeepSpeed, DALI) outlasts that second
    sleep = time.sleep

    def __del__(self):
        self.sleep(3)


held = Teardown()
print("the last line, not flushed yet", end="")
(sys.exit if how == "sys.exit" else exit_rank)(2)
"""


@pytest.mark.parametrize("how", ["exit_rank", "sys.exit"])
def test_a_rank_ends_with_its_exit_code_whatever_its_daemon_threads_do(tmp_path, how):
    """Any library's daemon thread that comes back from torch's C++ while the interpreter tears
    down aborts the process (sys.exit: the control, exit 250 through the launcher; seen in CI for
    an agreed config error with PeerWatch closed, twice). train/main.py ends its rank with
    exit_rank: threads joined, atexit handlers run and output flushed as in a normal exit, then the
    process ends with its own code, the interpreter not torn down."""
    script = tmp_path / "ending_rank.py"
    script.write_text(ENDING_RANK)
    import resource

    no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731 (the control aborts)
    done = subprocess.run([sys.executable, str(script), str(ROOT), how], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, preexec_fn=no_core)
    if how == "sys.exit":
        assert done.returncode == -signal.SIGABRT and "terminate called" in done.stderr, done.stderr[-3000:]
        return
    assert done.returncode == 2 and "terminate called" not in done.stderr, done.stderr[-3000:]
    assert done.stdout == "pool ran\nthe last line, not flushed yetatexit ran\n"


FAILED_RANK = """
import atexit, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import train.main as trainer

trainer.run_training = lambda args: 1  # a rank that stops after a peer's death, on its way out
# the launcher's SIGTERM to every rank once one has exited, as this one exits
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.5)))
trainer.exit_rank(trainer.main(["--ds_config", "ds_configs/zero2.json"]))
"""


def test_a_rank_on_its_way_out_exits_with_its_code_whatever_the_launcher_sends(tmp_path):
    """A rank done with its stop (its code 1) was killed by the launcher's SIGTERM if it came
    during the exit (main set SIGTERM's default action back): its peers then found it killed by
    SIGTERM and named it as the cause, not the rank that died first (seen in CI under torchrun)."""
    script = tmp_path / "failed_rank.py"
    script.write_text(FAILED_RANK)
    done = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "SIGTERM" not in done.stderr, done.stderr[-3000:]


def break_sample(split_dir: Path, key: str) -> Path:
    """Overwrites the JPEG of `key` with zeros in place and records the shard's new sha256 in the
    manifest, as shards written bad from the start would be: only decoding can find it."""
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            member = next((m for m in tar.getmembers() if m.name == f"{key}.jpg"), None)
        if member is None:
            continue
        with open(shard, "r+b") as f:
            f.seek(member.offset_data)
            f.write(bytes(member.size))
        manifest_path = split_dir.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        for record in manifest["splits"][split_dir.name]["shards"]:
            if record["name"] == shard.name:
                record["sha256"] = file_sha256(shard)
        manifest_path.write_text(json.dumps(manifest))
        return shard
    raise AssertionError(f"{key} is in no shard of {split_dir}")


def test_sigterm_saves_the_agreed_step_on_every_rank_and_resume_goes_on(files, tmp_path):
    """A preempted job: SIGTERM to all its processes (as SLURM sends it; the launcher relays it too
    and kills the ranks 30 s later). Every rank stops after the same step, saved complete, and
    --resume auto trains on from it to the end, each step once; the log interval cut by the stop is
    logged at the stop. W&B logs offline, as by default: its process ends with the job's signal
    (the launcher ends rank 0's children too), and the next log failed rank 0, so that a preempted
    run saved nothing; now W&B's logging stops there."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "150",
            "--micro_batch_size", "6", "--log_steps", "7", "--save_steps", "100", "--eval_steps", "100", "--record_keys"]
    job = subprocess.Popen(launcher(ranks=2) + args, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "WANDB_MODE": "offline"}, cwd=ROOT)
    try:
        wait_for_step(out, 3, job=job)
        assert signal_ranks(job, signal.SIGUSR1) == 2  # a hung run's diagnosis: each rank prints its stacks, trains on
        time.sleep(1)
        os.killpg(job.pid, signal.SIGTERM)
        output = finish(job, timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    stopped = re.search(r"SIGTERM \(preemption\): every rank stopped after step (\d+); saved (\S+);", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 3 < step < 150 and Path(stopped.group(2)) == out / "checkpoints" / f"step-{step:08d}"
    assert (Path(stopped.group(2)) / "complete.json").is_file() and max(losses_by_step(out)) == step
    for rank in (0, 1):
        assert [s for s, _ in keys_by_step(out, rank)] == list(range(1, step + 1))
    assert "Traceback" not in output and " failed " not in output, output[-3000:]
    assert len(re.findall(r"main\.py\", line \d+ in fit$", output, re.M)) == 2, output[-3000:]  # each rank's loop
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1

    done = train(args + ["--resume", "auto"], env={"WANDB_MODE": "offline"})
    assert f"(step {step})" in done.stdout
    assert sorted(losses_by_step(out)) == sorted({*range(7, 151, 7), step, 150})
    # W&B has every row metrics.jsonl has: the resumed run logs again the rows its stopped part lost
    # with its process (ended by the job's SIGTERM before it wrote them)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in runs}) == 1  # one W&B run, continued
    assert_wandb_holds(out)
    relogged = re.search(r"logged again: (\d+) row\(s\) of steps (\d+)-(\d+) that its stopped part", done.stdout)
    assert relogged and int(relogged.group(3)) == step, done.stdout[-3000:]
    for rank in (0, 1):  # 3 steps an epoch: every epoch's 36 samples once, across the stop
        keys = keys_by_step(out, rank)
        assert [s for s, _ in keys] == list(range(1, 151))
        other = keys_by_step(out, 1 - rank)
        for epoch in range(50):
            seen = [k for s, ks in keys + other if epoch * 3 < s <= epoch * 3 + 3 for k in ks]
            assert len(seen) == len(set(seen)) == 36, epoch


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's job has it (a background job's is ignored)


def _ctrl_c(files, out: Path, log: Path, *, via: str = "launch", env: dict, twice: bool = False,
            relayed: bool = False) -> str:
    """A 2-rank job stopped by Ctrl-C after step 4 (twice: again, a while after the first; relayed:
    SIGINT to each rank again within a second, as torchrun relays it); its output."""
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "1000",
            "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "3", "--eval_steps", "500"]
    with open(log, "w") as sink:
        job = subprocess.Popen(launcher(ranks=2, via=via) + args, start_new_session=True, stdout=sink,
                               stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT,
                               preexec_fn=_default_sigint)
    try:
        wait_for_step(out, 4, job=job)
        os.killpg(job.pid, signal.SIGINT)
        if relayed:
            time.sleep(0.2)
            assert signal_ranks(job, signal.SIGINT) == 2  # rank 0 0.2 s after the Ctrl-C, rank 1 0.7 s
        if twice:
            wait_for_text(log, "train: Ctrl-C: every rank saves a checkpoint within two steps and stops; Ctrl-C "
                               "again stops at once, without saving", job=job)
            time.sleep(1.5)  # (one within Preemption.RELAYED_S of the first is taken for a launcher's relay)
            os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    return log.read_text()


@pytest.mark.parametrize("via", ["launch", "torchrun"])
def test_ctrl_c_saves_and_stops_every_rank(files, tmp_path, via):
    """Ctrl-C: the terminal sends SIGINT to every process of the job. Each rank got a
    KeyboardInterrupt traceback wherever it was, and the steps since the last checkpoint were
    lost; now every rank saves the same step and stops, as on SIGTERM. W&B logs offline, as by
    default (DeepSpeed's launcher ends its process too). torchrun relays SIGINT to its ranks: a
    second one within a moment is that, not a second Ctrl-C: here each rank gets one more, in
    Python (in step 5, where both pause), a moment after the first, as a GPU rank, which waits
    little in C++, takes torchrun's."""
    out = tmp_path / "run"
    output = _ctrl_c(files, out, tmp_path / "job.log", via=via, relayed=True,
                     env={"WANDB_MODE": "offline", "TRAIN_FAIL_AT": "0:5:pause=4,1:5:pause=4"})
    rank_lines = "".join(line for line in output.splitlines(keepends=True) if not line.startswith(("W1", "Traceback",
                                                                                                  "torch.distributed")))
    # (torchrun's own SignalException traceback follows; the ranks' output has none)
    assert "Traceback" not in rank_lines and "KeyboardInterrupt" not in rank_lines, output[-3000:]
    stopped = re.search(r"train: stopped: Ctrl-C: every rank stopped after step (\d+); saved (\S+); --resume auto goes "
                        r"on from it", output)
    assert stopped and " failed " not in output and "stopped by a second Ctrl-C" not in output, output[-3000:]
    step = int(stopped.group(1))
    assert Path(stopped.group(2)) == out / "checkpoints" / f"step-{step:08d}"
    assert (Path(stopped.group(2)) / "complete.json").is_file() and max(losses_by_step(out)) == step


def test_ctrl_c_twice_stops_at_once_without_saving(files, tmp_path):
    """A second Ctrl-C stops at once, without saving: here while rank 0 pauses in step 5 (rank 1
    waits for it in a collective, where no Python handler runs)."""
    out = tmp_path / "run"
    output = _ctrl_c(files, out, tmp_path / "job.log", env={"WANDB_MODE": "disabled", "TRAIN_FAIL_AT": "0:5:pause=120"},
                     twice=True)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "train: rank 0: stopped by a second Ctrl-C at step 5, without saving\ntrain: the newest complete " \
           f"checkpoint, {out / 'checkpoints' / 'step-00000003'}, is intact (--resume auto goes on from it)" \
           in output, output[-3000:]
    # rank 1, back from the collective rank 0 left, stops on its own second Ctrl-C (rank 0 spoke
    # first: one line) or is stopped by rank 0 (as a rank of another node, which gets no Ctrl-C)
    assert re.findall(r"train: rank 1: .*", output) in (
        [], ["train: rank 1: stopping: rank 0 was stopped by Ctrl-C at step 5, without saving"]), output[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"]


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Ctrl-C in the first seconds of a run, while torch, DeepSpeed and transformers load, printed
    each rank's KeyboardInterrupt traceback from deep inside an import."""
    job = subprocess.Popen([sys.executable, str(ROOT / "train" / "main.py"), "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while "libtorch_cpu" not in Path(f"/proc/{job.pid}/maps").read_text():  # torch loads: seconds to go
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.01)
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130 and err == "\ntrain: stopped by Ctrl-C while loading its libraries; nothing was done\n", err
    assert "usage" not in out


@pytest.mark.parametrize("via", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_alone_saves_and_stops_every_rank(files, tmp_path, via):
    """SIGTERM to the launcher's pid only (`kill PID`; docker and Kubernetes signal PID 1). torchrun
    relays it to its ranks; the deepspeed runner does not (deepspeed#4098) and dies: its ranks see
    that it is gone. Either way every rank saves the same step, complete, and stops."""
    out = tmp_path / "run"
    job = subprocess.Popen(launcher(ranks=2, via=via) + [
        "--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "1000",
        "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "500", "--eval_steps", "500"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "WANDB_MODE": "disabled"}, cwd=ROOT)
    try:
        wait_for_step(out, 3, job=job)
        job.send_signal(signal.SIGTERM)
        output = finish(job, timeout=120)[0]  # until the ranks, which hold the output pipe, are gone too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    why = r"SIGTERM \(preemption\)" if via == "torchrun" else r"the deepspeed runner \(pid \d+ on \S+\) is gone"
    stopped = re.search(why + r": every rank stopped after step (\d+); saved (\S+);", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 3 < step < 1000 and Path(stopped.group(2)) == out / "checkpoints" / f"step-{step:08d}"
    assert (Path(stopped.group(2)) / "complete.json").is_file() and max(losses_by_step(out)) == step
    assert output.count("exits with return code = 7") == (1 if via == "deepspeed" else 0)  # launch.py's report


def test_two_nodes_share_checkpoints_kill_mid_save_and_resume(files, tmp_path):
    """Two nodes, one output dir, a save every step (pruned to 2 + best): killed while saving step 4,
    `--resume auto` on both nodes goes on from step 3 on both, to the end; rank 0 alone commits and
    prunes, so every folder left is complete and no temporary file remains."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "6",
            "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "1", "--eval_steps", "3"]
    nodes = two_nodes(args, tmp_path=tmp_path, env={"TRAIN_PAUSE_SAVE_AT_STEP": "4"})
    partial = out / "checkpoints" / "step-00000004"
    try:
        wait_for([partial / "trainer_state_rank0.pt", partial / "trainer_state_rank1.pt"])
    finally:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    assert not (partial / "complete.json").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"

    nodes = two_nodes(args + ["--resume", "auto"], tmp_path=tmp_path)
    logs = [finish(node, timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert "ignoring 1 incomplete checkpoint(s) (interrupted saves): step-00000004" in logs[0]
    assert f"resuming from {out / 'checkpoints' / 'step-00000003'} (step 3)" in logs[0]
    assert sorted(losses_by_step(out)) == list(range(1, 7))
    folders = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert folders[-2:] == ["step-00000005", "step-00000006"] and len(folders) <= 3  # + the best, if older
    assert all((out / "checkpoints" / f / "complete.json").is_file() for f in folders)
    assert (out / "checkpoints" / "latest").read_text() == "step-00000006"
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name or ".shared-" in p.name]


def test_full_disk_while_saving_is_one_message_and_resume_goes_on_after_space_is_freed(files, tmp_path):
    """Output dir on a 10 MiB file system, a 4.3 MiB checkpoint every step: the save of step 3
    fails with a warning before it, one message naming the checkpoint, the cause and the newest
    complete checkpoint, exit 6; once space is freed, --resume auto finishes the run."""
    from conftest import small_filesystem

    with small_filesystem(tmp_path / "small", "10m") as small:
        out = (small or tmp_path) / "run"
        args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "3",
                "--micro_batch_size", "6", "--save_steps", "1", "--eval_steps", "100", "--wandb_mode", "disabled"]
        done = train(args, check=False, env={} if small else {"TRAIN_ENOSPC_AT_STEP": "3"})
        checkpoints = out / "checkpoints"
        assert done.returncode == 6, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        message = [line.split("train: ", 1)[1] for line in done.stderr.splitlines() if "train: saving checkpoint" in line]
        assert len(message) == 1 and message[0].startswith(f"saving checkpoint {checkpoints / 'step-00000003'} failed: ")
        assert "No space left on device" in message[0] or "no space left" in message[0]
        assert f"the newest complete checkpoint is {checkpoints / 'step-00000002'}" in message[0]
        if small:
            assert "MiB free in" in done.stderr and "saving step-00000003 will likely fail" in done.stderr
        assert all((checkpoints / f"step-0000000{s}" / "complete.json").is_file() for s in (1, 2))
        assert (checkpoints / "latest").read_text() == "step-00000002"

        shutil.rmtree(checkpoints / "step-00000001")  # the user frees space
        resumed = train(args + ["--resume", "auto", "--save_total_limit", "1"])
        assert f"resuming from {checkpoints / 'step-00000002'} (step 2)" in resumed.stdout
        assert (checkpoints / "latest").read_text() == "step-00000003" and (out / "model" / "model.safetensors").is_file()


def test_build_locks_of_killed_runs_are_named_or_removed_and_sigterm_in_setup_stops_cleanly(
        files, tmp_path, request, monkeypatch):
    """torch's lock of an op build folder, left by a rank killed while it built or loaded the op:
    every later run waited for it forever, printing nothing. Held by no process, it is named while it
    may still be another machine's build, and SIGTERM then stops the waiting ranks with one line each
    (an exception, which releases what a rank holds, not the signal's default death); once older than
    any build it is removed and the run trains. A lock some process holds is left alone, and a rank
    ended by os._exit removes only the locks it holds."""
    # TORCH_EXTENSIONS_DIR/NAME/lock: a lock of the op a job whose config asks for DeepSpeed's own
    # Adam loads (on CPU ranks, its CPU fused Adam); the job waits for it before it builds anything
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    held = extensions / "other_op" / "lock"  # an op another process builds now: its lock is left alone
    held.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from torch.utils.file_baton import FileBaton; "
                               "FileBaton(sys.argv[1]).try_acquire(); time.sleep(600)", str(held)])
    request.addfinalizer(holder.kill)
    while not held.exists():
        time.sleep(0.1)
    os.utime(held, (time.time() - 1200, time.time() - 1200))
    env = {**os.environ, "WANDB_MODE": "disabled", "TORCH_EXTENSIONS_DIR": str(extensions)}
    out, log = tmp_path / "run", tmp_path / "job.log"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "2",
            "--micro_batch_size", "6", "--save_steps", "0"]
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = False
    (tmp_path / "ds_adam.json").write_text(json.dumps(config))
    with open(log, "w") as sink:
        job = subprocess.Popen(launcher(ranks=2) + ["--ds_config", str(tmp_path / "ds_adam.json"), *args[2:]],
                               stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        wait_for_text(log, "is held by no process on this machine", job=job)
        # SIGTERM once both ranks wait for the lock (a rank still in a collective or in C++ runs no
        # handler: it stops on its peer's word instead, as it should, but that is not what is tested)
        wait_in_frame(job, log, "file_baton.py")
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert f"train: {lock.resolve()} is held by no process on this machine" in output
    assert output.count("stopped by SIGTERM outside the training loop; nothing was saved") == 2, output[-3000:]
    assert "Traceback" not in output and lock.exists()

    os.utime(lock, (time.time() - 1200, time.time() - 1200))  # 20 minutes old: no build takes that long
    done = train(args, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert f"train: removed {lock.resolve()}, 20 min old and held by no process here" in done.stderr
    assert "train: done, 2 steps" in done.stdout and not lock.exists()
    assert held.exists() and "other_op" not in output + done.stderr
    # the first job waited without building; the second (torch's AdamW on CPU ranks) loaded no op
    assert [p.name for p in extensions.rglob("*") if p.is_file() and not p.name.startswith("cpuinfo-")] == ["lock"]

    # a rank that PeerWatch ends with os._exit first removes the locks it holds, and only those
    from torch.utils.file_baton import FileBaton
    from train.perf import release_build_locks

    own = extensions / "own_op" / "lock"
    own.parent.mkdir()
    assert FileBaton(str(own)).try_acquire()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    release_build_locks()
    assert not own.exists() and lock.exists() and held.exists()


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_trains(files, tmp_path):
    """The same command started twice: the second run would have written its checkpoints and metrics
    over the first's (and with --overwrite_output_dir deleted them). It is refused, naming the run that
    holds the folder; the first trains on, its checkpoints intact, and the folder is free once it ends."""
    out = tmp_path / "run"
    base = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--micro_batch_size", "6"]
    args = base + ["--max_steps", "3000", "--save_steps", "5", "--eval_steps", "1000"]
    first = subprocess.Popen(launcher(ranks=2) + args, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"}, cwd=ROOT)
    try:
        wait_for([out / "checkpoints" / "latest"], job=first)
        second = train(args + ["--overwrite_output_dir"], check=False, env={"WANDB_MODE": "disabled"})
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.search(rf"--output_dir {re.escape(str(out))} is in use by another run \(pid \d+ on \S+, since "
                         r"[\d-]+ [\d:]+\): wait for it to end", second.stderr), second.stderr[-3000:]
        assert first.poll() is None and (out / "checkpoints" / "latest").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with open(out / ".run.lock") as lock:  # free once rank 0 is gone: the kernel drops a dead process's flock
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the lock outlived the run"
                time.sleep(0.1)
