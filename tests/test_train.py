"""train/main.py under the real DeepSpeed launcher: 2 CPU ranks, ZeRO-2/3, two nodes, export, W&B."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import (ROOT, TINY_RESNET, TINY_VIT, common, evals, finish, free_port, launcher, metrics, photo,
                      train, two_nodes)
from train.metrics import history_row, wandb_records


def wandb_history(output_dir: Path, run: int = 0) -> tuple[dict[int, dict], dict]:
    """({trainer step: logged values}, run config) of the run-th offline W&B run (in time order);
    asserts that every chart follows the trainer's step."""
    run_file = sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))[run]
    assert run_file.read_bytes()[:4] == b":W&B", run_file  # (wandb_records reads nothing of another file)
    history, config, axes = {}, {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {name: json.loads(value) for name, value in history_row(record).items()}
            history.setdefault(row["trainer/step"], {}).update(row)
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "metric":
            axes[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    assert not history or axes.get("*") == "trainer/step", axes  # (a run whose process was killed may hold nothing)
    return history, config


def val_images(data: Path) -> list[tuple[Image.Image, int]]:
    images = []
    for shard in sorted((data / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            samples: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        images += [(Image.open(io.BytesIO(s["jpg"])), int(s["cls"])) for s in samples.values()]
    return images


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_train_evaluate_and_export(files, tmp_path, zero):
    from transformers import pipeline

    out = tmp_path / "run"
    done = train(["--ds_config", f"ds_configs/{zero}.json", *common(files, "digits", "resnet", out),
                  "--epochs", "2", "--micro_batch_size", "32", "--lr", "3e-3", "--log_steps", "5", "--eval_resize", "pillow",
                  *(["--channels_last"] if zero == "zero3" else [])], env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")})
    assert "best eval top-1" in done.stdout and str(out / "model") in done.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 2 and config["deepspeed"]["zero_optimization"]["stage"] == int(zero[-1])
    # CPU ranks compile no DeepSpeed op (its shared-memory all-reduce, its CPU fused Adam): torch's AdamW
    assert config["deepspeed"]["optimizer"]["params"]["torch_adam"] is True and not (tmp_path / "ops").exists()
    assert config["deepspeed"]["train_batch_size"] == 64
    from transformers import AutoModelForImageClassification  # counted before ZeRO-3 partitions the parameters
    exported = AutoModelForImageClassification.from_pretrained(out / "model")
    assert config["parameters"] == sum(p.numel() for p in exported.parameters()) > 0
    assert f"({config['parameters'] / 1e6:.2f}M parameters)" in done.stdout

    rows = metrics(out)
    losses = [m["train/loss"] for m in rows if "train/loss" in m]
    assert [m["step"] for m in rows if "train/loss" in m] == list(range(5, 51, 5))  # 1618 // 2 // 32 = 25 per epoch
    assert losses[-1] < 0.5 * losses[0]
    assert [(e["step"], e["eval/samples_counted"]) for e in evals(out)] == [(25, 179), (50, 179)]
    assert evals(out)[-1]["eval/top1"] > 0.8
    best = max(evals(out), key=lambda e: (e["eval/top1"], e["step"]))
    assert f"(from step-{best['step']:08d}, the best by eval top-1)" in done.stdout

    # the export (the best checkpoint) predicts class names with the HF processor (PIL) exactly as well
    # as the trainer's eval (whose exact eval resize feeds the model the processor's very pixels)
    classifier = pipeline("image-classification", model=str(out / "model"))
    images = val_images(files["digits"])
    hits = sum(classifier(image, top_k=1)[0]["label"] == str(label) for image, label in images)
    assert (len(images), hits) == (179, round(best["eval/top1"] * 179))

    # checkpoints: the last two and the best, each complete
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000025", "step-00000050"]
    assert all((out / "checkpoints" / k / "complete.json").is_file() for k in kept)
    assert (out / "checkpoints" / "latest").read_text() == "step-00000050"


def test_the_best_eval_is_the_export_whatever_the_save_cadence(files, tmp_path):
    """Evals every step, checkpoints every 3: a best eval between two saves is saved too, so the
    summary's best eval and the exported checkpoint are the same step (the newest among equals)."""
    out = tmp_path / "run"
    done = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "6",
                  "--micro_batch_size", "6", "--eval_steps", "1", "--save_steps", "3", "--lr", "3e-3",
                  "--save_total_limit", "1", "--wandb_mode", "disabled"])
    scores = [(e["eval/top1"], e["step"]) for e in evals(out)]
    assert [s for _, s in scores] == list(range(1, 7))
    top1, step = max(scores)
    assert f"best eval top-1 {top1:.2%} at step {step}" in done.stdout
    assert f"(from step-{step:08d}, the best by eval top-1)" in done.stdout
    kept = sorted(p.parent.name for p in (out / "checkpoints").glob("step-*/complete.json"))
    assert kept == sorted({f"step-{step:08d}", "step-00000006"})  # the best and the last (--save_total_limit 1)
    assert json.loads((out / "checkpoints" / f"step-{step:08d}" / "complete.json").read_text())["top1"] == top1


def test_every_shipped_deepspeed_config_trains_the_same(files, tmp_path):
    """fp32 ZeRO stages 1-3 and CPU offload are the same math: the same losses step by step."""
    losses = {}
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        out = tmp_path / name
        train(["--ds_config", f"ds_configs/{name}.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
               "--micro_batch_size", "6", "--log_steps", "1", "--wandb_mode", "disabled", "--eval_steps", "5"])
        losses[name] = [m["train/loss"] for m in metrics(out) if "train/loss" in m] + [evals(out)[-1]["eval/loss"]]
        # torch's AdamW on CPU ranks, ZeRO-Offload's too: no CPU Adam op to compile first
        assert json.loads((out / "run_config.json").read_text())["deepspeed"]["optimizer"]["params"]["torch_adam"]
    assert len(losses["zero1"]) == 6
    for name in ("zero2", "zero3", "zero3_offload"):
        assert losses[name] == pytest.approx(losses["zero1"], rel=1e-4), name
    # train/loss is the mean over the logged interval, not the interval's last step; --save_steps 0
    # (benchmarks) trains and evaluates alike, and writes no checkpoint and no export
    out = tmp_path / "interval"
    done = train(["--ds_config", "ds_configs/zero1.json", *common(files, "photos", "resnet", out), "--max_steps", "5",
                  "--micro_batch_size", "6", "--log_steps", "2", "--wandb_mode", "disabled", "--eval_steps", "5",
                  "--save_steps", "0"])
    assert "model and checkpoints: none (--save_steps 0)" in done.stdout
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    assert evals(out)[-1]["eval/loss"] == pytest.approx(losses["zero1"][-1], rel=1e-4)
    step_loss = losses["zero1"][:5]
    assert [(m["step"], m["train/loss"]) for m in metrics(out) if "train/loss" in m] == [
        (2, pytest.approx((step_loss[0] + step_loss[1]) / 2, rel=1e-4)),
        (4, pytest.approx((step_loss[2] + step_loss[3]) / 2, rel=1e-4)), (5, pytest.approx(step_loss[4], rel=1e-4))]


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(files, tmp_path):
    out = tmp_path / "run"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--epochs", "2",
           "--micro_batch_size", "6", "--log_steps", "1", "--label_smoothing", "0.1", "--mixup_alpha", "0.2",
           "--cutmix_alpha", "1.0", "--lr", "0.01", "--warmup_steps", "2", "--peak_tflops", "0.5"],
          env={"WANDB_MODE": "offline"})
    history, config = wandb_history(out)
    assert config["world_size"] == 2 and config["deepspeed"]["train_batch_size"] == 12
    rows = metrics(out)
    assert {m["step"] for m in rows} == set(history) == set(range(1, 7))  # 36 // 2 // 6 = 3 steps per epoch
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value, rel=1e-6), key
    expected = {"train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec", "perf/step_time",
                "perf/data_wait_fraction", "perf/tflops", "perf/mfu", "eval/loss", "eval/top1", "eval/top5"}
    # perf/tflops: the FLOPs of a forward and backward per image (counted at start) x images/s per rank
    assert config["train_flops_per_image"] > 0 and config["peak_tflops"] == 0.5
    for row in (r for r in rows if "perf/tflops" in r):
        assert row["perf/tflops"] == pytest.approx(config["train_flops_per_image"] * row["perf/images_per_sec"] / 2 / 1e12)
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / 0.5)
    assert expected <= set(history[3]) and expected <= set(history[6])
    assert history[3]["eval/samples/_type"] == "table-file" and history[3]["eval/samples/nrows"] == 6
    assert all(0 <= history[s]["perf/data_wait_fraction"] < 1 for s in history)
    # linear warmup over 2 steps, then cosine to 0 at step 6: the rate each step used
    cosine = [0.01 * (i / 2 if i < 2 else 0.5 * (1 + math.cos(math.pi * (i - 2) / 4))) for i in range(6)]
    assert [history[s]["train/lr"] for s in range(1, 7)] == pytest.approx(cosine, abs=1e-9)
    # the runs table's columns: the best eval (the newest among equals), not charted
    summary = {}
    for record in wandb_records(sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))[0]):
        if record.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.summary.update})
    best = max((history[s]["eval/top1"], s) for s in (3, 6))
    assert (summary["eval/best_top1"], summary["eval/best_step"]) == best and summary["eval/top1"] == history[6]["eval/top1"]
    assert not any("eval/best_top1" in row for row in history.values())


def test_evals_and_checkpoints_are_left_out_of_the_logged_throughput():
    """evaluate_and_save runs under off_the_clock: the log interval's clock (perf/images_per_sec,
    step_time, tflops, mfu) moves on by the time spent inside, even when what is inside fails."""
    import time

    import torch
    from train.main import new_meter, off_the_clock

    meter = new_meter()
    start, steps = meter["start"], meter["steps"]
    with off_the_clock(meter, torch.device("cpu")):
        time.sleep(0.2)
    assert meter["start"] >= start + 0.2 and meter["steps"] == steps
    with pytest.raises(OSError), off_the_clock(meter, torch.device("cpu")):
        time.sleep(0.1)
        raise OSError("disk full")
    assert meter["start"] >= start + 0.3


@pytest.mark.parametrize("network", ["no_route", "proxy_refuses"])
def test_wandb_online_without_its_server_trains_and_logs_offline(files, tmp_path, network):
    """An API key is configured but W&B's server cannot be reached (a compute node without internet):
    the run used to wait 90 s in wandb.init and die. It logs offline instead and says so: at once
    where the server has no route (checked before init), after init's timeout through a proxy."""
    out = tmp_path / "run"
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "https://api.wandb.invalid"}
    if network == "proxy_refuses":
        env |= {"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "WANDB_INIT_TIMEOUT": "5"}
    done = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", out), "--max_steps", "3",
                  "--micro_batch_size", "6", "--log_steps", "1", "--save_steps", "0"], ranks=None, env=env)
    said = re.search(r"W&B offline: online failed \((.+)\); `wandb sync DIR` uploads it later", done.stdout)
    assert said, done.stdout[-3000:]
    assert ("api.wandb.invalid" in said.group(1)) if network == "no_route" else ("proxy" in said.group(1))
    history, _ = wandb_history(out)
    assert sorted(history) == sorted({m["step"] for m in metrics(out)}) == [1, 2, 3]


def test_a_rendezvous_port_in_use_is_one_line_and_every_rank_ends(files, tmp_path, monkeypatch):
    """Another job holds the port (two jobs on one machine, the launcher's default port each): rank 0
    cannot listen on it, and says what to pass (it was torch's traceback). Rank 1, blocked in C++
    connecting to that other job's port, runs no Python handler: the launcher's SIGTERM still ends
    it within seconds, not at the launcher's SIGKILL 30 s later."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("", port := free_port()))
        taken.listen()
        job = subprocess.Popen(launcher(ranks=2, extra=["--master_port", str(port)]) + [
            "--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
            env={**os.environ, "WANDB_MODE": "disabled"})
        output = finish(job, timeout=120)[0]
    assert job.returncode == 2, output[-3000:]
    assert (f"train: rank 0: the rendezvous port {port} is taken on 127.0.0.1 (another job?): give this job one of "
            f"its own, `deepspeed --master_port N ...`") in output
    assert "Traceback" not in output
    # from the launcher's SIGTERM to the last rank's exit (its log's times: the ranks' start-up, slow
    # on a loaded machine, does not count)
    stamps = {what: [datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in
                     re.findall(rf"^\[([\d-]+ [\d:,]+)\] .*{what}", output, re.M)]
              for what in ("Killing subprocess", "exits with return code")}
    assert (stamps["exits with return code"][-1] - stamps["Killing subprocess"][0]).total_seconds() < 15, output

    # ranks that never came (a node that did not start): rank 0, which hosts the store, and the
    # others, which cannot reach it, each say so in a line after DEEPSPEED_TIMEOUT (torch's errors)
    import torch.distributed as dist
    from train.distributed import rendezvous_failure
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert rendezvous_failure(dist.DistStoreError(
        "Timed out after 601 seconds waiting for clients. 2/3 clients joined.")).startswith(
        "only 2 of the job's 3 ranks reached its rendezvous at node0:29500 within 601 s: the others did not start")
    assert rendezvous_failure(dist.DistNetworkError(
        "The client socket has timed out after 600000ms while trying to connect to (node0, 29500).")).startswith(
        "rank 0 could not be reached at node0:29500, the job's rendezvous, within 600 s: it did not start")
    assert rendezvous_failure(dist.DistBackendError("NCCL error: unhandled system error")) is None


def test_two_nodes_on_one_machine_see_every_sample_once_per_epoch(files, tmp_path):
    out = tmp_path / "run"
    args = ["--ds_config", str(ROOT / "ds_configs/zero2.json"), *common(files, "photos", "vit", out),
            "--epochs", "2", "--micro_batch_size", "6", "--record_keys"]
    nodes = two_nodes(args, tmp_path=tmp_path)
    logs = [finish(node, timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    seen = {rank: [json.loads(line) for line in (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    train_keys = shard_keys(files["photos"] / "train")
    for epoch in (0, 1):
        keys = [k for rank in (0, 1) for row in seen[rank][3 * epoch:3 * epoch + 3] for k in row["keys"]]
        assert len(keys) == 36 and set(keys) == train_keys  # 36 samples, each exactly once, across the nodes
    assert set(seen[0][0]["keys"]).isdisjoint(seen[1][0]["keys"])


def test_tasks_that_srun_starts_train_as_one_job_and_name_a_killed_peer(files, tmp_path):
    """`srun python train/main.py` (no launcher: SLURM starts every task, tests/srun_step.py doing
    what its step daemon does on each node): the tasks take their ranks, world, node and rendezvous
    from SLURM's variables; 3 tasks on 2 nodes (2 + 1) train as one job of 3 ranks, each sample
    once per epoch; a task killed outright (SIGKILL in step 2) is named by its node's other task
    (told apart by its SLURM_PROCID, job and step) and by the task of the other node. Neither a
    batch script (SLURM_PROCID without a step) nor a launcher under srun (RANK set) is remapped."""
    from train.distributed import srun_env

    def step(args: list[str], *, env: dict | None = None) -> list[subprocess.Popen]:
        env = {**os.environ, "WANDB_MODE": "disabled", "MASTER_PORT": str(free_port()), **(env or {})}
        return [subprocess.Popen([sys.executable, str(ROOT / "tests" / "srun_step.py"), "4242", str(node), "2,1",
                                  "localhost,localhost", "--", sys.executable, str(ROOT / "train" / "main.py"), *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                 start_new_session=True) for node in (0, 1)]

    out = tmp_path / "run"
    nodes = step(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--epochs", "1",
                  "--micro_batch_size", "4", "--record_keys"])
    logs = [finish(node, timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "train: 3 rank(s) on cpu" in logs[0]
    seen = [json.loads(line)["keys"] for rank in range(3)
            for line in (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(seen) == 9 and sorted(k for keys in seen for k in keys) == sorted(shard_keys(files["photos"] / "train"))

    nodes = step(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "killed"),
                  "--max_steps", "4", "--micro_batch_size", "4"], env={"TRAIN_FAIL_AT": "1:2:kill"})
    logs = [finish(node, timeout=600)[0] for node in nodes]
    assert nodes[0].returncode == 128 + 9 and nodes[1].returncode == 1, logs[0][-3000:] + logs[1][-3000:]
    for rank, log in ((0, logs[0]), (2, logs[1])):
        killed = rf"rank {rank}: stopping: rank 1's process \(pid \d+\) was killed by SIGKILL"
        assert re.search(killed, log), log[-3000:]
        assert "Traceback" not in log, log[-3000:]

    task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert srun_env(task) is None  # a batch script: no step
    assert srun_env({**task, "SLURM_STEP_ID": str(0xFFFFFFFE)}) is None  # (or the batch step's own id)
    assert srun_env({**task, "SLURM_STEP_ID": "0", "RANK": "0"}) is None  # srun torchrun ...: its launcher's
    assert srun_env({**task, "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "1"}) is None  # a step of one task
    assert srun_env({**task, "SLURM_STEP_ID": "3", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                     "SLURM_TASKS_PER_NODE": "4(x2)"}) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "4",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "20073"}
    from train.main import unseen_device  # each task given a GPU of its own (--gpus-per-task): refused, named
    assert unseen_device(0, 1) is None and unseen_device(3, 8) is None
    assert "is rank 3 of its node but sees 1 GPU(s)" in unseen_device(3, 1) and "--gpus-per-node" in unseen_device(3, 1)
    # a task bound to one CPU (srun's default without --cpus-per-task) feeds a GPU from one core: said in the banner
    from train.distributed import few_cores
    assert "may run on 1 of the node's 64 CPU cores" in few_cores("cuda", mine=1, node=64)
    assert "--cpus-per-task" in few_cores("cuda", mine=2, node=64)
    assert few_cores("cuda", mine=8, node=64) is None and few_cores("cuda", mine=2, node=2) is None  # a small machine
    assert few_cores("cpu", mine=1, node=64) is None  # the model computes on those cores: no GPU to starve


def test_gradient_checkpointing_gives_the_same_losses(files, tmp_path):
    losses = {}
    for flag in ([], ["--gradient_checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        done = train(["--ds_config", "ds_configs/zero3.json", *common(files, "photos", "vit", out), "--max_steps", "4",
                      "--micro_batch_size", "6", "--log_steps", "1", "--wandb_mode", "disabled", *flag], ranks=1)
        losses[bool(flag)] = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
        # no deprecation noise: neither transformers' old checkpointing name nor ZeRO-3's torch collectives
        assert "FutureWarning" not in done.stderr, done.stderr[-2000:]
    assert len(losses[False]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_shards_without_val_images_train_and_export_the_last_checkpoint(files, tmp_path):
    """Shards made with --val-fraction 0, on 2 ranks with --eval_steps 1: training says once that
    nothing is evaluated, logs no eval, writes no eval files and exports its last checkpoint."""
    from make_shards import make_shards

    shards, out = tmp_path / "shards", tmp_path / "run"
    make_shards(src=files["root"] / "photos", out=shards, val_fraction=0, max_count=6, progress=False)
    flags = common(files, "photos", "resnet", out)
    flags[flags.index("--data") + 1] = str(shards)
    done = train(["--ds_config", "ds_configs/zero2.json", *flags, "--max_steps", "3", "--eval_steps", "1",
                  "--log_steps", "1", "--micro_batch_size", "4", "--wandb_mode", "disabled", "--warmup_steps", "5",
                  "--lr", "1e-3"])
    assert (f"train: no val images in {shards}: nothing is evaluated, and the export is the last checkpoint"
            in done.stdout)
    # a warmup longer than the run (a smoke test beside a long run's flags): the lr never reaches --lr
    assert ("train: warning: the warmup (5 steps) is as long as the run (3) or longer: the learning rate rises to "
            "0.0004 at most, never to 0.001 (--warmup_steps)") in done.stdout
    assert max(m["train/lr"] for m in metrics(out)) == pytest.approx(1e-3 * 2 / 5)
    assert "(from step-00000003, the last)" in done.stdout and "final eval" not in done.stdout
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3] and not any(key.startswith("eval") for m in rows for key in m)
    assert (out / "model" / "model.safetensors").is_file() and not (out / "eval_results.json").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_builtin_default_trains_digits_to_90_percent(tmp_path, device):
    """The README's command: `deepspeed train/main.py --ds_config ds_configs/zero2.json`."""
    env = {"DDV_CACHE_DIR": str(tmp_path / "cache"), "DS_ACCELERATOR": device}
    done = train(["--ds_config", "ds_configs/zero2.json"], ranks=None, via="deepspeed", cwd=tmp_path, env=env)
    out = tmp_path / "outputs" / "digits-resnet-tiny"
    assert json.loads((out / "run_config.json").read_text())["device"] == device
    assert evals(out)[-1]["eval/top1"] >= 0.9 and evals(out)[-1]["eval/samples_counted"] == 179
    assert (out / "model" / "model.safetensors").is_file() and str(out / "model").endswith("digits-resnet-tiny/model")
    assert "outputs/digits-resnet-tiny/model" in done.stdout
    # a second run refuses to overwrite it, and says how to go on
    again = train(["--ds_config", "ds_configs/zero2.json"], ranks=None, cwd=tmp_path, check=False, env=env)
    assert again.returncode == 2 and "--resume auto" in again.stderr


@pytest.mark.parametrize("case", ["missing_data", "class_count", "batch_arithmetic", "zero_off", "unknown_model",
                                  "inconsistent_model", "processor", "out_of_range", "output_dir", "one_class"])
def test_bad_configuration_fails_before_training(files, tmp_path, case):
    (tmp_path / "a_file").write_text("")
    # shards of one class (make_shards refuses to write them now; older ones did, from a source folder
    # holding one folder with the class folders inside): a classifier of one class trained to 100% top-1
    shutil.copytree(files["photos"], tmp_path / "one_class")
    manifest = json.loads((tmp_path / "one_class" / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split["per_class"] = {"flowers": split["samples"]}
    (tmp_path / "one_class" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "one_class" / "classes.json").write_text(json.dumps(["flowers"]))
    out = tmp_path / ("a_file/run" if case == "output_dir" else "run")  # (it was a traceback from mkdir)
    args = {"missing_data": ["--data", str(tmp_path / "nowhere"), "--model_config", str(files["resnet"]),
                             "--processor", str(files["processor"])],
            "class_count": ["--data", str(files["photos"]), "--model_config", str(tmp_path / "five.json"),
                            "--processor", str(files["processor"])],
            "batch_arithmetic": ["--data", str(files["photos"]), "--model_config", str(files["resnet"]),
                                 "--processor", str(files["processor"]), "--ds_config", str(tmp_path / "ds.json"),
                                 "--micro_batch_size", "8"],
            "zero_off": ["--data", str(files["photos"]), "--model_config", str(files["resnet"]),
                         "--processor", str(files["processor"]), "--ds_config", str(tmp_path / "zero0.json")],
            "unknown_model": ["--data", str(files["photos"]), "--model", str(tmp_path / "no-such-model")],
            "inconsistent_model": ["--data", str(files["photos"]), "--model_config", str(tmp_path / "convnext.json"),
                                   "--processor", str(files["processor"])],
            "processor": ["--data", str(files["photos"]), "--model_config", str(files["vit"])],
            # a micro batch of 0 divided by zero in the loader, an --epochs 0 "trained" nothing
            "out_of_range": ["--data", str(files["photos"]), "--model_config", str(files["resnet"]),
                             "--processor", str(files["processor"]), "--micro_batch_size", "0", "--epochs", "0"],
            "output_dir": ["--data", str(files["photos"]), "--model_config", str(files["resnet"]),
                           "--processor", str(files["processor"])],
            "one_class": ["--data", str(tmp_path / "one_class"), "--model_config", str(files["resnet"]),
                          "--processor", str(files["processor"])]}[case]
    (tmp_path / "five.json").write_text(json.dumps({**TINY_RESNET, "num_labels": 5}))
    # two stages' sizes, and ConvNeXt's default of 4 stages: transformers fails deep inside the model's __init__
    (tmp_path / "convnext.json").write_text(json.dumps({"model_type": "convnext", "hidden_sizes": [16, 32],
                                                        "depths": [1, 1]}))
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 20, "train_micro_batch_size_per_gpu": "auto"}))
    # without ZeRO, DeepSpeed's bf16 optimizer fails to build on CPU, and its checkpoints do not export
    zero0 = {**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), "zero_optimization": {"stage": 0}}
    (tmp_path / "zero0.json").write_text(json.dumps(zero0))
    done = train([*args, "--output_dir", str(out)], ranks=None, check=False, env={"WANDB_MODE": "disabled"})
    expected = {"missing_data": f"{tmp_path / 'nowhere'}/manifest.json not found",
                "class_count": "has 5 labels but the shards have 4 classes",
                "batch_arithmetic": "train_batch_size 20 != micro batch 8 x grad_accum 1 x world size 1 = 8",
                "zero_off": "ZeRO is off (zero_optimization.stage 0 or absent); use stage 1 (ds_configs/zero1.json",
                "unknown_model": f"--model {tmp_path / 'no-such-model'}: cannot build an image classifier",
                "inconsistent_model": f"--model_config {tmp_path / 'convnext.json'}: transformers failed building the "
                                      f"model from its config (IndexError: list index out of range)",
                "processor": "pass --processor NAME_OR_DIR",
                "out_of_range": "  - --epochs 0: above 0\n  - --micro_batch_size 0: 1 or more\n",
                "output_dir": f"--output_dir {out}: {tmp_path / 'a_file'} is a file, not a folder",
                "one_class": f"--data {tmp_path / 'one_class'}: its classes are ['flowers']: a classifier needs two "
                             f"classes or more"}[case]
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-3000:]
    assert "nothing was trained" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def shard_keys(split_dir: Path) -> set[str]:
    keys = set()
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".cls")}
    return keys


def test_mixup_and_cutmix_targets_follow_the_mixed_pixels():
    import numpy as np
    import torch
    from train.augment import mix_batch

    pixels = torch.stack([torch.from_numpy(np.array(photo(n, (40, 32)))).permute(2, 0, 1).float() for n in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    rng = np.random.default_rng(0)
    mixed, targets = mix_batch(pixels, labels, num_classes=5, mixup_alpha=0.4, cutmix_alpha=0.0, rng=rng)
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and targets[0, 3].item() == pytest.approx(1 - lam) and targets.sum(1).tolist() == [1.0] * 4
    assert torch.allclose(mixed, lam * pixels + (1 - lam) * pixels.flip(0))

    mixed, targets = mix_batch(pixels, labels, num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, rng=rng)
    pasted = ((mixed[0] == pixels[3]).all(0) & (pixels[0] != pixels[3]).any(0)).float().mean().item()
    assert 0 < pasted < 1 and (mixed[0] == pixels[0]).all(0).float().mean().item() == pytest.approx(1 - pasted, abs=0.02)
    # the partner's target weight is the pasted box's share of the image
    assert targets[0, 3].item() == pytest.approx(pasted, abs=0.02) and targets[0, 0] + targets[0, 3] == 1
    assert mix_batch(pixels, labels, num_classes=5, mixup_alpha=0, cutmix_alpha=0, rng=rng)[1] is labels


def test_random_erasing_boxes_the_images_it_draws_with_noise_and_leaves_the_rest():
    """erase_batch as timm's RandomErasing ("pixel" mode, one box): each erased image has one
    rectangle, every channel, of 2-33% of its area on average as drawn, at positions reaching every
    edge, filled with N(0, 1) noise; the others are untouched; about `prob` of the images; the
    same seed, the same boxes; dtype and memory format kept."""
    import torch
    from train.augment import erase_batch

    pixels = torch.full((400, 3, 24, 40), 5.0)  # no noise value is 5.0
    assert erase_batch(pixels, prob=0.0) is pixels
    torch.manual_seed(0)
    out = erase_batch(pixels, prob=1.0)
    changed = out != pixels
    assert torch.equal(changed.all(1), changed.any(1))  # every channel of a pixel, or none
    boxes = changed[:, 0]
    rows, columns = boxes.any(2), boxes.any(1)
    assert torch.equal(boxes.sum((1, 2)), rows.sum(1) * columns.sum(1))  # one rectangle each
    assert bool(boxes.any((1, 2)).all())  # every image: a box of 24 x 40 always fits in ten draws
    share = boxes.float().mean((1, 2))
    assert 0.15 < share.mean().item() < 0.2 and share.min().item() > 0.01 and share.max().item() < 0.45
    assert rows[:, 0].any() and rows[:, -1].any() and columns[:, 0].any() and columns[:, -1].any()
    noise = out[changed]
    assert abs(noise.mean().item()) < 0.05 and 0.95 < noise.std().item() < 1.05
    torch.manual_seed(0)
    assert torch.equal(erase_batch(pixels, prob=1.0), out)
    erased = erase_batch(pixels, prob=0.25).ne(pixels).any(1).any(1).any(1).sum().item()
    assert 60 < erased < 140  # 100 expected, 4.6 standard deviations either side
    channels_last = erase_batch(pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), prob=0.5)
    assert channels_last.dtype == torch.bfloat16 and channels_last.is_contiguous(memory_format=torch.channels_last)


def test_drop_path_builds_the_model_with_its_stochastic_depth_and_is_refused_where_there_is_none(files, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification
    from train.args import out_of_range, parse_args
    from train.main import _flag_problems, _model
    from train.model import build_model

    convnext = {"model_type": "convnext", "num_stages": 2, "hidden_sizes": [8, 16], "depths": [2, 2], "image_size": 32}
    AutoModelForImageClassification.from_config(AutoConfig.for_model(**convnext)).save_pretrained(tmp_path / "convnext")
    classes = ["a", "b", "c"]
    problems = []
    net, _, _ = _model(parse_args(["--model", str(tmp_path / "convnext"), "--processor", str(files["processor"]),
                                   "--drop_path", "0.3"]), builtin=False, classes=classes, problems=problems)
    assert problems == [] and net.config.drop_path_rate == 0.3
    rates = [m.drop_prob for m in net.modules() if type(m).__name__.endswith("DropPath")]
    assert rates == pytest.approx([0.1, 0.2, 0.3])  # spread over the 4 blocks from 0 (the first: none)
    pixels = torch.randn(32, 3, 32, 32)
    net.train()
    assert not torch.equal(net(pixel_values=pixels).logits, net(pixel_values=pixels).logits)
    net.eval()
    assert torch.equal(net(pixel_values=pixels).logits, net(pixel_values=pixels).logits)
    built, _, _ = build_model(model=None, model_config=convnext, processor=files["processor"], classes=classes,
                              problems=problems, drop_path=0.2)
    assert problems == [] and built.config.drop_path_rate == 0.2
    plain, _, _ = build_model(model=None, model_config=convnext, processor=files["processor"], classes=classes,
                              problems=problems)
    assert problems == [] and plain.config.drop_path_rate == 0.0  # the config's own
    assert build_model(model=None, model_config=TINY_VIT, processor=files["processor"], classes=classes,
                       problems=problems, drop_path=0.1) == (None, None, None)
    assert problems == ["--drop_path: transformers' vit has no stochastic depth (no drop_path_rate in its config; "
                        "ConvNeXt, Swin, BEiT, DINOv2 and others have one); drop the flag"]
    assert out_of_range(parse_args(["--drop_path", "1", "--model", "m"])) == ["--drop_path 1: from 0 to below 1"]
    assert _flag_problems(parse_args(["--drop_path", "0.1", "--model", "m", "--freeze_backbone"]))[0].startswith(
        "--drop_path with --freeze_backbone: the frozen backbone runs as in eval")
    assert _flag_problems(parse_args(["--layer_decay", "0.7", "--model", "m", "--freeze_backbone"])) == [
        "--layer_decay with --freeze_backbone: only the head trains, at --lr; drop one"]


def test_random_erasing_and_drop_path_train_and_resume_exactly(files, tmp_path):
    """A ConvNeXt with --drop_path 0.2 and --random_erase 0.5 on 2 ranks: the export's config has
    the rate; another run's resume from step 2 computes step 3's loss as the run did (the erasing's
    and the drop path's random draws go on from the checkpoint); without the erasing, the first
    step's loss is another (a random model's loss barely follows its input: by 1e-3 or less)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    convnext = {"model_type": "convnext", "num_stages": 2, "hidden_sizes": [8, 16], "depths": [2, 2], "image_size": 32}
    AutoModelForImageClassification.from_config(AutoConfig.for_model(**convnext)).save_pretrained(tmp_path / "convnext")

    def run(out, *extra):
        return train(["--ds_config", "ds_configs/zero2.json", "--data", str(files["photos"]), "--model",
                      str(tmp_path / "convnext"), "--processor", str(files["processor"]), "--output_dir", str(out),
                      "--precision", "fp32", "--micro_batch_size", "6", "--save_steps", "1", "--log_steps", "1",
                      "--save_total_limit", "5", "--wandb_mode", "disabled", *extra])

    def losses(out):
        return {m["step"]: m["train/loss"] for m in metrics(out) if "train/loss" in m}

    recipe = ["--drop_path", "0.2", "--random_erase", "0.5"]
    run(tmp_path / "straight", *recipe, "--max_steps", "3")
    assert AutoConfig.from_pretrained(tmp_path / "straight" / "model").drop_path_rate == 0.2
    run(tmp_path / "resumed", *recipe, "--max_steps", "3", "--resume",
        str(tmp_path / "straight" / "checkpoints" / "step-00000002"))
    assert list(losses(tmp_path / "resumed")) == [3]
    assert losses(tmp_path / "resumed")[3] == losses(tmp_path / "straight")[3]
    run(tmp_path / "plain", "--drop_path", "0.2", "--max_steps", "1")  # no erasing: another first loss
    assert losses(tmp_path / "plain")[1] != pytest.approx(losses(tmp_path / "straight")[1], rel=1e-6)


def test_a_resume_lists_a_zero_config_change_its_checkpoint_can_follow_and_refuses_the_others():
    """ZeRO-1 <-> 2 (one checkpoint format) and CPU offload on or off are changes the banner lists;
    another stage than the checkpoint's (3 has its own format) is refused."""
    from train.args import TrainArgs
    from train.config import resolve_batch
    from train.resume import recipe_changes, training_recipe

    def recipe(name: str) -> dict:
        raw = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        config = resolve_batch(raw, TrainArgs(micro_batch_size=8), world_size=2, problems=[])
        return training_recipe(TrainArgs(), config, world_size=2, precision="fp32", total_steps=10, warmup_steps=0,
                               image_size=(32, 32))

    def changes(saved: str, now: str) -> tuple[list[str], list[str]]:
        problems: list[str] = []
        return recipe_changes({"step": 4, "recipe": recipe(saved)}, recipe(now), path=Path("ckpt"),
                              problems=problems), problems

    assert recipe("zero3_offload")["offload"] == "optimizer to cpu, param to cpu" and recipe("zero3")["offload"] == "none"
    assert changes("zero2", "zero2") == ([], [])
    assert changes("zero2", "zero1") == (["zero_stage 2 -> 1"], [])
    assert changes("zero3", "zero3_offload") == (["offload none -> optimizer to cpu, param to cpu"], [])
    assert changes("zero3_offload", "zero3") == (["offload optimizer to cpu, param to cpu -> none"], [])
    listed, problems = changes("zero2", "zero3")
    assert len(problems) == 1 and problems[0].startswith("--resume ckpt: saved under ZeRO-2, this run's --ds_config "
                                                         "has ZeRO-3; resume with a ZeRO-2 config")
    # a checkpoint from before the offload was recorded compares what it has
    old = {key: value for key, value in recipe("zero3").items() if key != "offload"}
    assert recipe_changes({"step": 4, "recipe": old}, recipe("zero3_offload"), path=Path("ckpt"), problems=[]) == []


def test_deepspeed_config_auto_values_and_conflicts():
    import torch
    from train.args import TrainArgs
    from train.config import resolve_batch, resolve_precision, resolve_schedule

    raw = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    problems: list[str] = []
    args = TrainArgs(micro_batch_size=8, grad_accum=2, lr=0.01)
    config = resolve_batch(raw, args, world_size=3, problems=problems)
    assert problems == [] and config["train_batch_size"] == 48 and config["optimizer"]["params"]["lr"] == 0.01
    assert resolve_precision(config, TrainArgs(precision="fp32"), device_type="cpu", problems=problems) == "fp32"
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    # no scheduler section: Hugging Face's schedule from --lr_scheduler; a DeepSpeed one gets its autos
    for name, at_90 in (("cosine", 0.01 * 0.5 * (1 + math.cos(math.pi * 85 / 95))), ("linear", 0.01 * 10 / 95),
                        ("constant", 0.01)):
        factory = resolve_schedule(config, TrainArgs(lr_scheduler=name), total_steps=100, warmup_steps=5)
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        scheduler = factory(optimizer)
        rates = []
        for _ in range(91):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert rates[:6] == pytest.approx([0, 0.002, 0.004, 0.006, 0.008, 0.01]) and rates[90] == pytest.approx(at_90)
    with_section = {**config, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto",
                                                                               "warmup_num_steps": "auto"}}}
    assert resolve_schedule(with_section, args, total_steps=100, warmup_steps=5) is None
    assert with_section["scheduler"]["params"] == {"total_num_steps": 100, "warmup_num_steps": 5}
    assert "scheduler" not in config

    fixed = {**raw, "train_micro_batch_size_per_gpu": 16, "train_batch_size": 64}
    resolve_batch(fixed, TrainArgs(micro_batch_size=8), world_size=2, problems=problems)
    assert len(problems) == 2
    assert "train_micro_batch_size_per_gpu is 16 but --micro_batch_size is 8" in problems[0]
    assert "train_batch_size 64 != micro batch 16 x grad_accum 1 x world size 2 = 32; use --grad_accum 2" in problems[1]
    problems.clear()
    resolve_precision({"fp16": {"enabled": True}}, TrainArgs(), device_type="cpu", problems=problems)
    from deepspeed.accelerator import get_accelerator  # fp16 on CPUs with fp16 instructions (AMX-FP16)

    assert problems == ([] if get_accelerator().is_fp16_supported() else
                        ["--precision fp16 needs a GPU (DeepSpeed has no fp16 on this CPU); use bf16 or fp32"])


@pytest.mark.parametrize("labels, zero", [("seven", "zero3"), ("renamed", "zero1"), ("shuffled", "zero2"),
                                          ("same", "zero3")])
def test_pretrained_head_is_replaced_when_its_classes_differ(files, tmp_path, labels, zero):
    """A saved model fine-tuned on the 4-class photo shards: a 7-class head, or a 4-class head with
    other class names, is initialised afresh; a head with these very classes is kept; a head that
    knows some of them among others, in another order, gives each its trained row and the rest a
    fresh one; the body is kept in every case, under every ZeRO stage."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessorPil

    pretrained = tmp_path / "pretrained"
    torch.manual_seed(1)
    names = {"seven": [f"other{i}" for i in range(7)], "renamed": [f"other{i}" for i in range(4)],
             "shuffled": ["class2", "other", "class0", "class3", "more"],
             "same": [f"class{i}" for i in range(4)]}[labels]
    config = AutoConfig.for_model(**TINY_VIT, num_labels=len(names), id2label=dict(enumerate(names)),
                                  label2id={n: i for i, n in enumerate(names)})
    model = AutoModelForImageClassification.from_config(config)
    model.classifier.bias.data = torch.arange(len(names), dtype=torch.float32) + 1  # each row told apart
    model.save_pretrained(pretrained)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(pretrained)
    out = tmp_path / "run"
    done = train(["--ds_config", f"ds_configs/{zero}.json", "--data", str(files["photos"]), "--model", str(pretrained),
                  "--output_dir", str(out), "--precision", "fp32", "--max_steps", "2", "--micro_batch_size", "6",
                  "--lr", "1e-9", "--warmup_steps", "1", "--lr_scheduler", "constant", "--wandb_mode", "disabled"])
    exported, original = load_file(out / "model" / "model.safetensors"), load_file(pretrained / "model.safetensors")
    assert exported["classifier.weight"].shape == (4, 32) and original["classifier.weight"].shape == (len(names), 32)
    body = [k for k in original if not k.startswith("classifier.")]
    assert body and all(exported[k].allclose(original[k], atol=1e-6) for k in body)  # lr 1e-9: unchanged
    weight, bias = exported["classifier.weight"], exported["classifier.bias"]
    for i in range(4):  # each class's row: the pretrained one of its name, else a fresh one (bias 0)
        if f"class{i}" in names:
            j = names.index(f"class{i}")
            assert weight[i].allclose(original["classifier.weight"][j], atol=1e-6), i
            assert bias[i].item() == pytest.approx(j + 1, abs=1e-5), i
        else:
            assert not any(weight[i].allclose(row, atol=1e-3) for row in original["classifier.weight"]), i
            assert bias[i].item() == pytest.approx(0, abs=1e-5), i
    assert exported["classifier.weight"].std() == pytest.approx(0.02, rel=0.5)  # the model's own init (std 0.02)
    assert {"seven": "train: classifier head: new for 4 classes (", "renamed": "train: classifier head: new for 4",
            "shuffled": "train: classifier head: 3 of 4 classes' rows from", "same": "train: classifier head: kept (4 "
            }[labels] in done.stdout
    labels = json.loads((out / "model" / "config.json").read_text())["id2label"]
    assert labels == {str(i): f"class{i}" for i in range(4)}
    assert [m["train/lr"] for m in metrics(out) if "train/lr" in m][-1] == pytest.approx(1e-9)


def test_a_model_whose_labels_are_spelt_decomposed_matches_the_same_classes_composed(tmp_path):
    """A model trained on shards of a Mac's folder names (decomposed, NFD, as make_shards wrote them
    before it wrote NFC) and today's shards of the same folders: the same classes. --eval_only takes
    it, and fine-tuning keeps its head (not a new one for names that only look the same)."""
    import unicodedata

    import torch
    from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessorPil
    from train.model import build_model, load_trained

    classes = ["caf\u00e9", "cr\u00e8me", "tea"]
    decomposed = [unicodedata.normalize("NFD", name) for name in classes]
    assert decomposed != classes
    config = AutoConfig.for_model(**TINY_VIT, id2label=dict(enumerate(decomposed)),
                                  label2id={n: i for i, n in enumerate(decomposed)})
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "model")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    problems = []
    model, _ = load_trained(model=str(tmp_path / "model"), processor=None, classes=classes, problems=problems)
    assert problems == [] and model is not None
    torch.manual_seed(0)
    _, _, head = build_model(model=str(tmp_path / "model"), model_config=None, processor=None, classes=classes,
                             problems=problems)
    assert problems == [] and head.startswith("kept (3 classes"), head


def test_builtin_recipe_fills_only_the_arguments_not_given():
    from train.args import parse_args
    from train.main import BUILTIN_RECIPE, _with_recipe

    args = _with_recipe(parse_args(["--epochs", "3", "--hflip", "0.5", "--local_rank", "0"]), BUILTIN_RECIPE)
    assert (args.epochs, args.hflip) == (3.0, 0.5)  # given, though equal to the defaults
    assert (args.crop_scale, args.lr) == (BUILTIN_RECIPE["crop_scale"], BUILTIN_RECIPE["lr"])
    assert _with_recipe(parse_args([]), BUILTIN_RECIPE).epochs == BUILTIN_RECIPE["epochs"]


def test_flags_nothing_else_checks_are_named_when_wrong():
    from train.args import parse_args
    from train.main import _at_image_size, _flag_problems
    from train.model import builtin_processor

    assert _flag_problems(parse_args(["--hw_decoder_load", "1.0", "--profile", "20:10", "--nan_guard", "stop",
                                      "--save_steps", "0", "--eval_steps", "1", "--log_steps", "1",
                                      "--peer_timeout", "10", "--labels_by_id", "--model", "m"])) == []
    problems = _flag_problems(parse_args(["--profile", "20", "--synthetic_data", "--baseline_loader",
                                          "--crop_scale", "0.9", "0.5", "--peer_timeout", "3", "--labels_by_id"]))
    assert [p.split(" ")[0] for p in problems] == ["--profile", "--synthetic_data", "--crop_scale", "--peer_timeout",
                                                   "--labels_by_id"]
    assert problems[2] == "--crop_scale 0.9 0.5: the smaller area first" and "there is no --model" in problems[4]
    assert problems[3].startswith("--peer_timeout 3: 10 s or more")
    problems = []
    assert _at_image_size(parse_args(["--image_size", "0"]), None, builtin_processor(), problems) == (None,) * 4
    assert problems == ["--image_size 0: a side of 1 pixel or more"]


def test_every_flag_with_a_range_takes_its_bounds_and_names_a_value_past_them():
    """Each field's `within` interval, through the command line: a closed end is taken, an open end
    and a step past a closed one are refused in one line naming the flag and the range; an eval
    checks the flags it reads only."""
    from dataclasses import fields

    from train.args import TrainArgs, interval_words, out_of_range, parse_args

    ranged = {f.name: f.metadata["within"] for f in fields(TrainArgs) if f.metadata["within"]}
    # the ones a bad value used to crash or mislead with: a ZeroDivisionError, 0 steps "done", lr < 0 trained
    assert {"micro_batch_size", "grad_accum", "eval_batch_size", "epochs", "max_steps", "lr", "label_smoothing",
            "hflip", "crop_scale", "data_threads"} <= set(ranged)
    for name, within in ranged.items():
        low, high = (float(b) for b in within[1:-1].split(","))
        whole = fields(TrainArgs)[[f.name for f in fields(TrainArgs)].index(name)].type.startswith("int")
        step = 1 if whole else 0.01
        cases = [(low, within[0] == "["), (low - step, False)]
        if high != float("inf"):
            cases += [(high, within[-1] == "]"), (high + step, False)]
        for value, taken in cases:
            text = str(int(value)) if whole else f"{value:g}"
            argv = [f"--{name}", *([text, "1"] if name == "crop_scale" else [text])]
            shown = f"{text} 1" if name == "crop_scale" else text
            assert out_of_range(parse_args(argv)) == ([] if taken else [f"--{name} {shown}: {interval_words(within)}"])
    assert out_of_range(parse_args(["--layer_decay", "1.5"])) == ["--layer_decay 1.5: above 0, at most 1"]
    assert out_of_range(parse_args(["--ema_decay", "1", "--micro_batch_size", "0", "--epochs", "0"])) == [
        "--epochs 0: above 0", "--micro_batch_size 0: 1 or more", "--ema_decay 1: from 0 to below 1"]
    assert [interval_words(w) for w in ("[0, 1]", "(0, 1)", "[0, inf)")] == ["from 0 to 1", "above 0, below 1",
                                                                               "0 or more"]
    # --eval_only: --lr is not read there (named as unused instead), --eval_batch_size is
    assert out_of_range(parse_args(["--eval_only", "--lr", "-1", "--eval_batch_size", "0"]), training=False) == [
        "--eval_batch_size 0: 1 or more"]
    assert "(default: 0.5; from 0 to 1)" in " ".join(parse_help())  # --help shows each range


def parse_help() -> list[str]:
    from train.args import parse_args

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_args(["--help"])
    return out.getvalue().split()


def test_decoder_flags_reach_the_train_and_eval_decoders():
    from pipelines.dali import Decoding, decoder_args
    from train.args import parse_args
    from train.main import decoding_of

    args = parse_args(["--hw_decoder_load", "1", "--train_fancy_upsampling"])
    assert decoding_of(args, train=True) == Decoding(hw_decoder_load=1.0, fancy_upsampling=True)
    gpu_train = decoder_args(gpu=True, decoding=decoding_of(parse_args([]), train=True), train=True)
    gpu_eval = decoder_args(gpu=True, decoding=decoding_of(parse_args([]), train=False), train=False)
    assert gpu_train == {"device": "mixed", "jpeg_fancy_upsampling": False}  # nvJPEG's default unless asked
    assert gpu_eval == {"device": "mixed", "jpeg_fancy_upsampling": True}  # Pillow's chroma upsampling
    assert decoder_args(gpu=False, decoding=decoding_of(args, train=True), train=True) == {"device": "cpu"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_priority_stream_outranks_the_default_stream_on_a_gpu(device):
    import torch
    from train.main import compute_stream

    assert compute_stream(torch.device(device), high_priority=False) is None
    stream = compute_stream(torch.device(device), high_priority=True)
    if device == "cpu":
        assert stream is None  # nothing to schedule: the flag is a no-op on CPU
    else:
        assert stream.priority < torch.cuda.default_stream().priority


def test_batchnorm_statistics_stay_fp32_beside_bf16_parameters():
    """prepare_precision: running statistics in fp32 track a mean of 1000.3 as an fp32 BatchNorm
    does (bf16 statistics stall at 968: their momentum updates fall below one bf16 step)."""
    import torch
    from train.model import prepare_precision

    torch.manual_seed(0)
    reference, model = torch.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Identity())
    model.register_buffer("scale", torch.ones(1))
    prepare_precision(model, torch.bfloat16)
    for p in model.parameters():  # what DeepSpeed does: parameters only
        p.data = p.data.bfloat16()
    for _ in range(300):
        x = torch.randn(8, 4, 5, 5) * 3 + 1000.3
        reference(x)
        out = model(x.bfloat16())
    bn = model[0]
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert torch.allclose(bn.running_mean, reference.running_mean, atol=0.1)
    assert model.scale.dtype == torch.bfloat16  # other buffers follow the parameters


def test_bf16_training_keeps_fp32_batchnorm_statistics_close_to_an_fp32_run(files, tmp_path):
    import torch

    runs = {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        train(["--ds_config", "ds_configs/zero2.json", *common(files, "digits", "resnet", out), "--max_steps", "6",
               "--micro_batch_size", "16", "--precision", precision, "--wandb_mode", "disabled",
               "--lr", "1e-7"])  # weights barely move: the statistics differ by bf16 arithmetic alone
        states = torch.load(next((out / "checkpoints").glob("step-*/mp_rank_00_model_states.pt")), weights_only=False)
        runs[precision] = {k: v for k, v in states["module"].items() if "running_" in k}
    assert runs["bf16"] and all(v.dtype == torch.float32 for v in runs["bf16"].values())
    for name, value in runs["fp32"].items():
        assert torch.allclose(runs["bf16"][name], value, rtol=0.02, atol=0.01), name


def test_precision_auto_never_picks_emulated_bf16(monkeypatch):
    import torch
    from train.config import hardware_precision

    for native in (True, False):  # an A100/H100, then a V100/T4 (bf16 only emulated)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n or including_emulation)
        assert hardware_precision("cuda") == ("bf16" if native else "fp16")


def test_weight_decay_skips_parameters_by_kind():
    from transformers import AutoConfig, AutoModelForImageClassification
    from train.model import parameter_groups

    config = {"model_type": "beit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "use_relative_position_bias": True,
              "layer_scale_init_value": 0.1}
    for values in (TINY_VIT, TINY_RESNET, config):
        model = AutoModelForImageClassification.from_config(AutoConfig.for_model(**values))
        decay, no_decay = parameter_groups(model)
        assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
        names = {id(p): n for n, p in model.named_parameters()}
        exempt = {names[id(p)] for p in no_decay["params"]}
        decayed = {names[id(p)] for p in decay["params"]}
        assert exempt | decayed == set(names.values()) and not exempt & decayed
        for name in exempt:
            assert name.endswith(("bias", "cls_token", "position_embeddings", "lambda_1", "lambda_2",
                                  "relative_position_bias_table")) or "norm" in name, name
        assert all(name.endswith("weight") and "norm" not in name for name in decayed), decayed
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= {
        n for n, p in AutoModelForImageClassification.from_config(AutoConfig.for_model(**TINY_VIT)).named_parameters()}


SMALL_TRANSFORMER = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize("family", ["vit", "deit", "beit", "dinov2", "clip", "siglip", "swin", "swinv2", "convnext",
                                    "convnextv2", "resnet", "efficientnet"])
def test_layer_decay_groups_count_depth_as_beit_and_simmim_do(family):
    """--layer_decay's parameter groups: the embeddings (a convolutional stem) at depth 0, the i-th
    layer at i + 1 (Swin, ConvNeXt, ResNet: their blocks counted across stages, a stage's
    downsampling with its nearest block: Swin's last, as SimMIM counts, ConvNeXt's first, as timm
    does), the rest (final norm, pooler, head, BEiT's shared relative position bias) at L + 1; each
    group's rate lr x decay^(L + 1 - depth), the head's group first; every parameter once, decayed
    or not as without it. EfficientNet has no stages of blocks: refused."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification
    from train.args import parse_args
    from train.main import _layer_decay_problems
    from train.model import layer_depths, layer_stages, parameter_groups

    swin = {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [2, 1], "num_heads": [1, 2], "window_size": 2}
    convnext = {"hidden_sizes": [16, 32], "depths": [2, 1], "num_stages": 2}
    values = {"vit": SMALL_TRANSFORMER, "deit": SMALL_TRANSFORMER, "dinov2": SMALL_TRANSFORMER,
              "beit": {**SMALL_TRANSFORMER, "use_shared_relative_position_bias": True, "use_mean_pooling": True},
              "clip": {"vision_config": SMALL_TRANSFORMER}, "siglip": {"vision_config": SMALL_TRANSFORMER},
              "swin": swin, "swinv2": swin, "convnext": convnext, "convnextv2": convnext, "resnet": TINY_RESNET,
              "efficientnet": {"image_size": 32, "hidden_dim": 64, "width_coefficient": 0.25,
                               "depth_coefficient": 0.5}}[family]
    values = {k: v for k, v in values.items() if k != "model_type"}
    model = AutoModelForImageClassification.from_config(AutoConfig.for_model(family, num_labels=5, architectures=[],
                                                                             **values))
    args = parse_args(["--layer_decay", "0.5"])
    stages = layer_stages(model)
    if family == "efficientnet":
        assert stages is None
        assert any(f"--layer_decay: {type(model).__name__} has no stack of layers to count depth in" in problem
                   for problem in _layer_decay_problems(args, model, {}))
        return
    assert _layer_decay_problems(args, model, {}) == []
    depths, names = layer_depths(model, stages), {id(p): n for n, p in model.named_parameters()}
    assert sorted(set(depths.values())) == [0, 1, 2, 3, 4]  # 3 layers (in stages: blocks 2 + 1, ResNet 1 + 1 + 1)
    per_stage = values.get("depths", [])
    for name, depth in depths.items():
        layer = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
        block = re.search(r"\.(?:layers|stages)\.(\d+)\.(?:blocks|layers)\.(\d+)\.", name)
        after = re.search(r"\.layers\.(\d+)\.downsample\.", name)  # Swin: after its stage's blocks
        before = re.search(r"\.stages\.(\d+)\.downsampling_layer\.", name)  # ConvNeXt: before them
        if {"embeddings", "embedder"} & set(name.split(".")):
            assert depth == 0, name
        elif block:
            assert depth == sum(per_stage[:int(block[1])]) + int(block[2]) + 1, name
        elif after:
            assert depth == sum(per_stage[:int(after[1]) + 1]), name
        elif before:
            assert depth == sum(per_stage[:int(before[1])]) + 1, name
        elif layer:
            assert depth == int(layer[1]) + 1, name
        else:
            assert depth == 4, name
    assert {n for n, d in depths.items() if d == 0} & {n for n in depths if "embed" in n}
    assert any(depths[n] == 4 for n in depths if n.startswith("classifier"))
    if family == "beit":
        assert depths["beit.shared_position_bias.relative_position_bias_table"] == 4
    if family.startswith("swin"):
        assert depths[f"{family}.encoder.layers.0.downsample.reduction.weight"] == 2
    if family.startswith("convnext"):
        assert depths[f"{family}.encoder.stages.1.downsampling_layer.1.weight"] == 3

    groups = parameter_groups(model, lr=1e-3, layer_decay=0.5)
    plain = {names[id(p)]: "weight_decay" in g for g in parameter_groups(model) for p in g["params"]}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (4 - depths[name])), name
            assert ("weight_decay" in group) == plain[name], name  # exempt from decay as without it
    assert groups[0]["lr"] == 1e-3 and any(re.fullmatch(r"classifier\.(1\.)?weight", names[id(p)])  # ResNet's: 1.
                                           for p in groups[0]["params"])
    assert torch.is_tensor(groups[0]["params"][0])
    assert any("scheduler section" in problem for problem in _layer_decay_problems(args, model, {"scheduler": {}}))


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "beit", "clip", "siglip", "swin", "convnext", "levit"])
def test_a_model_at_another_image_size_computes_what_transformers_interpolates(family):
    """model_at_size (--image_size, or a processor of another size than the model's): the position
    embeddings (BEiT: also its relative position bias tables) resampled once give the logits
    transformers computes when it interpolates them in every forward pass (interpolate_pos_encoding;
    DINOv2 and BEiT's tables always), at a larger and a smaller size, bit for bit, and the config
    states the new size. Models that take any size (a Swin without absolute embeddings, ConvNeXt)
    are kept, their config's size updated; LeViT's attention biases follow the size and are no
    position embeddings: refused, named."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification
    from train.model import model_at_size, size_bound

    swin = {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [2, 1], "num_heads": [1, 2], "window_size": 2}
    values = {"vit": SMALL_TRANSFORMER, "deit": SMALL_TRANSFORMER, "dinov2": SMALL_TRANSFORMER,
              "beit": {**SMALL_TRANSFORMER, "use_absolute_position_embeddings": True, "use_relative_position_bias": True},
              "clip": {"vision_config": SMALL_TRANSFORMER}, "siglip": {"vision_config": SMALL_TRANSFORMER},
              "swin": {**swin, "use_absolute_embeddings": True},
              "convnext": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "image_size": 32},
              "levit": {"image_size": 32, "hidden_sizes": [16, 32, 48], "num_attention_heads": [1, 2, 3],
                        "depths": [1, 1, 1], "key_dim": [8, 8, 8]}}[family]
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(
        AutoConfig.for_model(family, num_labels=5, architectures=[], **values)).eval()
    with torch.no_grad():  # position embeddings start at zero: give them values whose resampling shows
        for name, parameter in model.named_parameters():
            if "position" in name:
                parameter.normal_()
    vision = lambda net: getattr(net.config, "vision_config", None) or net.config  # noqa: E731
    if family == "levit":
        with pytest.raises(ValueError, match=r"its levit\.encoder\.stages\.0\.layers\.0\.module\.attention_biases is "
                                             r"\(1, 4\) at its image size and \(1, 9\) at this one, and is no "
                                             r"position embedding or relative position bias table of its 2x2 "
                                             r"patches to resample"):
            model_at_size(model, (48, 48))
        return
    assert size_bound(model) == (family != "convnext")
    for size, grid in ((48, "6x6" if family != "swin" else "12x12"), (24, "3x3" if family != "swin" else "6x6")):
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            interpolated = model(pixel_values=pixels, **({} if family in ("dinov2", "convnext") else
                                                         {"interpolate_pos_encoding": True})).logits
        fitted, note = model_at_size(model, (size, size))
        assert not fitted.training and vision(fitted).image_size == size
        if family == "convnext":
            assert fitted is model and note is None and not size_bound(model)
        else:
            assert fitted is not model and note.startswith(
                ("position embeddings and relative position bias tables" if family == "beit" else "position embeddings")
                + f" resampled from {'8x8' if family == 'swin' else '4x4'} to {grid} patches for {size}x{size} images")
            assert {name for name, p in fitted.named_parameters()} == {name for name, p in model.named_parameters()}
            for name, parameter in model.named_parameters():  # all else as it was
                if "position" not in name:
                    assert torch.equal(parameter, fitted.get_parameter(name)), name
        with torch.no_grad():
            assert torch.equal(fitted(pixel_values=pixels).logits, interpolated)
    plain_swin = AutoModelForImageClassification.from_config(AutoConfig.for_model("swin", num_labels=5, **swin))
    assert not size_bound(plain_swin) and model_at_size(plain_swin, (48, 48)) == (plain_swin, None)


def test_layer_decay_on_or_off_is_kept_at_a_resume_and_its_value_may_change():
    from train.resume import recipe_changes

    saved = {"step": 3, "recipe": {"precision": "fp32", "zero_stage": 2, "optimizer": "AdamW", "layer_decay": 0.5,
                                   "freeze_backbone": False}}
    recipe = {**saved["recipe"], "steps": 10}
    problems = []
    assert recipe_changes(saved, {**recipe, "layer_decay": 0.7}, path=Path("ck"), problems=problems) == [
        "layer_decay 0.5 -> 0.7"] and problems == []
    for before, after in ((0.5, 1.0), (1.0, 0.5)):
        problems = []
        recipe_changes({**saved, "recipe": {**saved["recipe"], "layer_decay": before}},
                       {**recipe, "layer_decay": after}, path=Path("ck"), problems=problems)
        assert len(problems) == 1 and f"saved by a run with --layer_decay {before:g}, this one has {after:g}" in problems[0]
    problems = []  # a checkpoint from before the flag: saved without it
    recipe_changes({**saved, "recipe": {k: v for k, v in saved["recipe"].items() if k != "layer_decay"}},
                   {**recipe, "layer_decay": 0.5}, path=Path("ck"), problems=problems)
    assert len(problems) == 1 and "--layer_decay 1, this one has 0.5" in problems[0]



def test_a_resume_at_another_image_size_is_refused_where_the_position_embeddings_follow_it():
    """DeepSpeed cannot load position embeddings of another grid: a resume at another image size
    is a configuration error saying what to pass; a model that takes any size (a ConvNeXt trained
    at growing sizes) goes on, the change listed."""
    from train.resume import recipe_changes

    saved = {"step": 3, "recipe": {"precision": "fp32", "zero_stage": 2, "optimizer": "AdamW", "layer_decay": 1.0,
                                   "freeze_backbone": False, "image_size": [48, 48]}}
    recipe = {**saved["recipe"], "steps": 10, "image_size": [32, 32]}
    problems = []
    assert recipe_changes(saved, recipe, path=Path("ck"), problems=problems, size_bound=True) == []
    assert problems == ["--resume ck: trained on 48x48 images, this run's are 32x32, and the model's position "
                        "embeddings are sized for its images: resume with --image_size 48, or start a new run from "
                        "its weights: `python tools/export_checkpoint.py ck OUT`, then --model OUT"]
    problems = []
    assert recipe_changes(saved, recipe, path=Path("ck"), problems=problems) == ["image_size (48, 48) -> (32, 32)"]
    assert problems == []
    assert recipe_changes({**saved, "recipe": {**saved["recipe"], "image_size": [32, 32]}}, recipe, path=Path("ck"),
                          problems=problems, size_bound=True) == [] and problems == []

def test_a_frozen_backbone_runs_as_in_eval_whatever_the_engine_asks():
    """freeze_backbone: only the head's parameters take gradients; in training mode the backbone
    still runs as in eval (a ViT's dropout off: the same logits twice; a ResNet's BatchNorm
    statistics unchanged), as it did when it was trained, while the head's modules train. Turning
    it on or off at a resume is refused (the optimizer holds other parameters)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification
    from train.model import freeze_backbone
    from train.resume import recipe_changes

    vit = AutoModelForImageClassification.from_config(AutoConfig.for_model(
        **{**TINY_VIT, "hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5}, num_labels=3))
    resnet = AutoModelForImageClassification.from_config(AutoConfig.for_model(**TINY_RESNET, num_labels=3))
    for model, head in ((vit, {"classifier.weight", "classifier.bias"}),
                        (resnet, {"classifier.1.weight", "classifier.1.bias"})):
        total = sum(p.numel() for p in model.parameters())
        assert freeze_backbone(model) == total - sum(model.get_parameter(name).numel() for name in head)
        model.train()
        assert model.training and {n for n, m in model.named_modules() if m.training} == {
            "", *{name.rsplit(".", 1)[0] for name in head}, *(["classifier"] if model is resnet else [])}
        statistics = {n: b.clone() for n, b in model.named_buffers()}
        pixels = torch.randn(4, 3, 32, 32)
        logits = model(pixel_values=pixels).logits
        assert torch.equal(logits, model(pixel_values=pixels).logits)
        logits.sum().backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == head
        assert all(torch.equal(b, statistics[n]) for n, b in model.named_buffers())
    model.eval()
    assert not any(m.training for m in model.modules())

    saved = {"step": 3, "recipe": {"precision": "fp32", "zero_stage": 2, "optimizer": "AdamW", "layer_decay": 1.0,
                                   "freeze_backbone": True}}
    for now, hint in ((False, "this one trains every parameter; resume with it"),
                      (True, None)):
        problems = []
        assert recipe_changes(saved, {**saved["recipe"], "steps": 10, "freeze_backbone": now}, path=Path("ck"),
                              problems=problems) == []
        assert (len(problems) == 1 and hint in problems[0]) if hint else problems == []
    problems = []  # a checkpoint from before the flag trained every parameter
    recipe_changes({"step": 3, "recipe": {k: v for k, v in saved["recipe"].items() if k != "freeze_backbone"}},
                   {**saved["recipe"], "steps": 10}, path=Path("ck"), problems=problems)
    assert len(problems) == 1 and "saved by a run training every parameter, this one has --freeze_backbone" in problems[0]


def test_freeze_backbone_trains_the_head_only_and_leaves_the_backbone_as_it_was(files, tmp_path):
    """--freeze_backbone, a linear probe of a pretrained ResNet: the head trains; every backbone
    weight and BatchNorm statistic comes out of the export bit for bit as pretrained, under ZeRO-2
    and under ZeRO-3 on 3 ranks (whose averaging of equal statistics would change them); a ZeRO-3
    checkpoint resumes on other ranks. A resume on ranks where one holds no part of the head's
    bias, which DeepSpeed's universal checkpoint cannot load under ZeRO-2, is refused, named."""
    import torch
    from transformers import AutoModelForImageClassification

    pretrained = tmp_path / "pretrained"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", pretrained), "--max_steps", "2",
           "--micro_batch_size", "6", "--wandb_mode", "disabled"], ranks=None)
    before = AutoModelForImageClassification.from_pretrained(pretrained / "model").state_dict()
    head = {"classifier.1.weight", "classifier.1.bias"}

    def probe(zero: str, out, *extra, ranks=2, check=True):
        return train(["--ds_config", f"ds_configs/{zero}.json", "--data", str(files["photos"]), "--model",
                      str(pretrained / "model"), "--freeze_backbone", "--output_dir", str(out), "--precision", "fp32",
                      "--micro_batch_size", "6", "--lr", "1e-2", "--export", "last", "--wandb_mode", "disabled", *extra],
                     ranks=ranks, check=check)

    def assert_probed(out):
        after = AutoModelForImageClassification.from_pretrained(out / "model").state_dict()
        assert after.keys() == before.keys()
        assert [k for k in before if not torch.equal(before[k], after[k])] == sorted(head, reverse=True)

    done = probe("zero2", tmp_path / "zero2", "--max_steps", "2")
    assert "train: backbone frozen (0.31M parameters): the head's 516 train" in done.stdout
    assert json.loads((tmp_path / "zero2" / "run_config.json").read_text())["frozen_parameters"] == sum(
        v.numel() for k, v in before.items() if k not in head and "running" not in k and "batches" not in k)
    assert_probed(tmp_path / "zero2")
    refused = probe("zero2", tmp_path / "zero2", "--max_steps", "3", "--resume", "auto", ranks=3, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "saved by 2 rank(s); on 3, rank 2 holds no part of the parameter group of classifier.1.bias (4 values), " \
           "which DeepSpeed's universal checkpoint cannot load under ZeRO-1/2: resume on 2 rank(s)" in refused.stderr

    probe("zero3", tmp_path / "zero3", "--max_steps", "2", ranks=3)
    assert_probed(tmp_path / "zero3")
    done = probe("zero3", tmp_path / "zero3", "--max_steps", "3", "--resume", "auto")
    assert "train: resuming from" in done.stdout and "ranks 3 -> 2" in done.stdout
    assert_probed(tmp_path / "zero3")

    # in bf16 DeepSpeed holds the frozen weights in bf16: the export takes them as loaded, in fp32
    done = probe("zero2", tmp_path / "bf16", "--max_steps", "2", "--precision", "bf16")
    assert "(from step-00000002, the last, the frozen backbone in fp32)" in done.stdout
    assert_probed(tmp_path / "bf16")
    tool = subprocess.run([sys.executable, "tools/export_checkpoint.py", str(tmp_path / "bf16" / "checkpoints" /
                           "step-00000002"), str(tmp_path / "bf16" / "model")], capture_output=True, text=True, cwd=ROOT)
    assert tool.returncode == 0 and "(the frozen backbone in fp32)" in tool.stdout, tool.stderr[-2000:]
    assert_probed(tmp_path / "bf16")


def test_ema_averages_every_step_and_is_what_evals_and_the_export_use(files, tmp_path):
    """--ema_decay on 3 ranks, over two epochs: each checkpoint's average is lerp(the step before's,
    this step's weights, 1 - decay) bit for bit, under ZeRO-2 and ZeRO-3; the export holds the
    average, and --eval_only of it gives the run's eval; swapping the average in for each eval and
    out again leaves training alone (the same losses as without it, and the trained weights'
    evals, eval_no_ema/, equal to that run's); a resume on 2 ranks takes its share of the saved
    average, and one from a checkpoint without an average starts it from the weights."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageClassification

    decay = 0.75

    def run(out, zero, *extra, ranks=3, ema=True):
        return train(["--ds_config", f"ds_configs/zero{zero}.json", *common(files, "photos", "vit", out),
                      "--micro_batch_size", "4", "--max_steps", "5", "--save_steps", "1", "--eval_steps", "2",
                      "--save_total_limit", "10", "--log_steps", "1", "--wandb_mode", "disabled", *extra]
                     + (["--ema_decay", str(decay)] if ema else []), ranks=ranks)

    def folder(out, step):
        return out / "checkpoints" / f"step-{step:08d}"

    def averages_follow(out, steps, previous):  # the weights of each step, averaged into the one before
        for step in steps:
            average = torch.load(folder(out, step) / "ema.pt", weights_only=True)
            weights = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=folder(out, step).name)
            assert average.keys() == previous.keys() and average.keys() <= weights.keys()
            assert [name for name in average if not torch.equal(
                average[name], torch.lerp(previous[name], weights[name], 1 - decay))] == [], step
            assert any(not torch.equal(average[name], weights[name]) for name in average)
            previous = average

    def steps(out, key):
        return {m["step"]: m[key] for m in metrics(out) if key in m}

    zero2 = tmp_path / "zero2"
    done = run(zero2, 2)
    assert f"train: weight average (EMA), decay {decay:g}: evals and the export use it" in done.stdout
    averages_follow(zero2, [2, 3, 4, 5], torch.load(folder(zero2, 1) / "ema.pt", weights_only=True))
    exported = int(re.search(r"\(from step-(\d+), the best by eval top-1, its weight average\)", done.stdout)[1])
    model = dict(AutoModelForImageClassification.from_pretrained(zero2 / "model").named_parameters())  # its names
    average = torch.load(folder(zero2, exported) / "ema.pt", weights_only=True)
    assert [name for name, value in average.items() if not torch.equal(model[name], value)] == []
    trained = get_fp32_state_dict_from_zero_checkpoint(str(zero2 / "checkpoints"), tag=folder(zero2, exported).name)
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), str(folder(zero2, exported)),
                           str(tmp_path / "trained"), "--trained_weights"], check=True, capture_output=True, text=True)
    assert "(its weight average)" not in tool.stdout
    model = dict(AutoModelForImageClassification.from_pretrained(tmp_path / "trained").named_parameters())
    assert [name for name in average if not torch.equal(model[name], trained[name])] == []
    train(["--eval_only", "--model", str(zero2 / "model"), "--data", str(files["photos"]), "--output_dir",
           str(tmp_path / "eval"), "--precision", "fp32", "--wandb_mode", "disabled"], ranks=None)
    assert metrics(tmp_path / "eval")[0]["eval/loss"] == pytest.approx(steps(zero2, "eval/loss")[exported], rel=1e-6)
    assert set(steps(zero2, "eval_no_ema/loss")) == set(steps(zero2, "eval/loss")) == {2, 4, 5}

    zero3, plain = tmp_path / "zero3", tmp_path / "plain"
    run(zero3, 3)
    run(plain, 3, ema=False)
    averages_follow(zero3, [2, 3, 4, 5], torch.load(folder(zero3, 1) / "ema.pt", weights_only=True))
    assert steps(zero3, "train/loss") == steps(plain, "train/loss") and len(steps(plain, "train/loss")) == 5
    for key in ("loss", "top1", "top5"):
        assert steps(zero3, f"eval_no_ema/{key}") == steps(plain, f"eval/{key}")
    assert steps(zero3, "eval/loss") != steps(plain, "eval/loss")

    resumed = run(tmp_path / "two", 2, "--resume", str(folder(zero2, 2)), "--max_steps", "3", ranks=2)
    assert "ranks 3 -> 2" in resumed.stdout
    averages_follow(tmp_path / "two", [3], torch.load(folder(zero2, 2) / "ema.pt", weights_only=True))
    turned_on = run(tmp_path / "on", 3, "--resume", str(folder(plain, 2)), "--max_steps", "3")
    assert "step-00000002 holds no weight average: the average (--ema_decay) starts from its weights" in turned_on.stdout
    assert f"ema_decay 0.0 -> {decay}" in turned_on.stdout
    averages_follow(tmp_path / "on", [3], get_fp32_state_dict_from_zero_checkpoint(str(plain / "checkpoints"),
                                                                                   tag=folder(plain, 2).name))

def test_ema_averages_the_batchnorm_statistics_and_the_export_and_evals_use_them(files, tmp_path):
    """--ema_decay on a ResNet (BatchNorm) on 3 ranks: ema.pt also holds the running statistics'
    average, each checkpoint's that of the step before averaged with this step's statistics (the
    ranks' mean, as the checkpoint holds them); the export holds it, and --eval_only of the export
    gives the run's final eval: the run's evals ran with it, not with the statistics as trained."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageClassification

    decay, out = 0.75, tmp_path / "run"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--micro_batch_size", "4",
           "--max_steps", "4", "--save_steps", "1", "--eval_steps", "2", "--save_total_limit", "10", "--export",
           "last", "--ema_decay", str(decay), "--wandb_mode", "disabled"], ranks=3)
    exported = AutoModelForImageClassification.from_pretrained(out / "model")
    statistics = [name for name, b in exported.named_buffers() if b.is_floating_point()]
    assert len(statistics) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in exported.modules()) > 0

    def saved(step):
        tag = f"step-{step:08d}"
        return (torch.load(out / "checkpoints" / tag / "ema.pt", weights_only=True),
                get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag))

    previous, _ = saved(1)
    for step in (2, 3, 4):
        average, trained = saved(step)
        for name in statistics:
            torch.testing.assert_close(average[name], torch.lerp(previous[name], trained[name], 1 - decay),
                                       rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
        assert any(not torch.allclose(average[name], trained[name]) for name in statistics)
        previous = average
    buffers = dict(exported.named_buffers())
    assert [name for name in statistics if not torch.equal(buffers[name], average[name])] == []
    train(["--eval_only", "--model", str(out / "model"), "--data", str(files["photos"]), "--output_dir",
           str(tmp_path / "eval"), "--precision", "fp32", "--wandb_mode", "disabled"], ranks=None)
    final = [m for m in metrics(out) if "eval/loss" in m][-1]
    assert final["step"] == 4 and final["eval/loss"] != final["eval_no_ema/loss"]
    assert metrics(tmp_path / "eval")[0]["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)

    # the run's folder or a checkpoint passed as --model: what to pass instead
    from train.model import load_trained

    classes = list(json.loads((out / "model" / "config.json").read_text())["id2label"].values())
    newest = out / "checkpoints" / "step-00000004"
    for given, expected in ((out, f"a training run's output dir; its model is {out / 'model'}"),
                            (newest, f"a checkpoint, not a model: export one with `python tools/export_checkpoint.py "
                                     f"{newest} OUT`, then pass --model OUT")):
        problems: list[str] = []
        assert load_trained(model=str(given), processor=None, classes=classes, problems=problems) == (None, None)
        assert problems == [f"--model {given}: {expected}"]


@pytest.mark.parametrize("family", ["deit", "swin", "convnext"])
def test_layer_decay_trains_each_depth_at_its_rate_and_a_resume_on_other_ranks_at_another(files, tmp_path, family):
    """A DeiT from its config (transformers maps the type to two classifiers and fails on a config
    naming neither; the plain one is built), a Swin and a ConvNeXt (blocks counted across stages), with
    --layer_decay 0.5: Adam's first step moves a weight by its group's rate x |g| / (|g| + eps), so
    with a tiny eps every parameter's median move is lr x 0.5^(L + 1 - depth). The DeiT's step
    after, from that checkpoint on 3 ranks (a universal checkpoint), with decay 0.8 and with 0.5:
    the same gradients and moments, so every weight moves in the ratio of the two rates, exactly as
    the new decay says."""
    import torch
    from transformers import AutoModelForImageClassification
    from train.model import build_model, layer_depths, layer_stages

    def exported(out: Path) -> dict:  # by the module's names (transformers saves some under older ones)
        return dict(AutoModelForImageClassification.from_pretrained(out / "model").named_parameters())

    deit = tmp_path / f"{family}.json"
    deit.write_text(json.dumps({**SMALL_TRANSFORMER, "model_type": "deit", "hidden_dropout_prob": 0.0,
                                "attention_probs_dropout_prob": 0.0} if family == "deit" else
                               {"model_type": "swin", "image_size": 32, "patch_size": 4, "embed_dim": 16,
                                "depths": [2, 1], "num_heads": [1, 2], "window_size": 2, "drop_path_rate": 0.0}
                               if family == "swin" else
                               {"model_type": "convnext", "hidden_sizes": [16, 32], "depths": [2, 1], "num_stages": 2,
                                "layer_scale_init_value": 1.0}))  # at 1e-6 its blocks' gradients are ~1e-11
    classes = json.loads((files["digits"] / "classes.json").read_text())
    torch.manual_seed(0)  # as the trainer builds it (--seed 0)
    model, *_ = build_model(model=None, model_config=str(deit), processor=str(files["processor"]), classes=classes,
                            problems=[])
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    depths = layer_depths(model, layer_stages(model))
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["eps"] = 1e-14  # Adam's first step then moves every weight whose gradient is
    (tmp_path / "zero2.json").write_text(json.dumps(config))  # above 1e-9 by its rate (Swin's q and k: ~1e-7)
    flags = ["--data", str(files["digits"]), "--model_config", str(deit), "--processor", str(files["processor"]),
             "--ds_config", str(tmp_path / "zero2.json"),
             "--precision", "fp32", "--micro_batch_size", "16", "--lr", "1e-3", "--lr_scheduler", "constant",
             "--warmup_steps", "0", "--weight_decay", "0", "--max_grad_norm", "0", "--export", "last",
             "--eval_steps", "1", "--log_steps", "1", "--wandb_mode", "disabled"]
    first = tmp_path / "first"
    done = train([*flags, "--output_dir", str(first), "--max_steps", "1", "--layer_decay", "0.5"])
    layers = "layers 1 to 3 at x 0.125 to x 0.5 of it, the embeddings" if family == "deit" else \
        "blocks 1 to 3 at x 0.125 to x 0.5 of it, the stem"  # counted across stages
    assert f"train: layer decay 0.5: the head at the learning rate, {layers} at x 0.0625" in done.stdout
    assert json.loads((first / "model" / "config.json").read_text())["architectures"] == [type(model).__name__]
    step1 = exported(first)
    for name, before in initial.items():
        if name.endswith(("k_proj.bias", "key.bias")):  # softmax ignores a shift of every key: no gradient
            continue
        moved = (step1[name].detach() - before).abs().flatten()
        assert moved.median().item() == pytest.approx(1e-3 * 0.5 ** (4 - depths[name]), rel=1e-3), name
    if family != "deit":
        return

    later = {}
    for decay in ("0.8", "0.5"):
        out = tmp_path / f"decay{decay}"
        done = train([*flags, "--output_dir", str(out), "--max_steps", "2", "--layer_decay", decay,
                      "--resume", str(first / "checkpoints" / "step-00000001")], ranks=3)
        assert ("layer_decay 0.5 -> 0.8" in done.stdout) == (decay == "0.8")
        later[decay] = exported(out)
    with torch.no_grad():
        moves = {decay: {name: p - step1[name] for name, p in weights.items()} for decay, weights in later.items()}
    for name in step1:
        fast, slow = moves["0.8"][name], moves["0.5"][name]
        ratio = (fast[slow.abs() > 1e-7] / slow[slow.abs() > 1e-7]).median().item()
        assert ratio == pytest.approx((0.8 / 0.5) ** (4 - depths[name]), rel=1e-3), name


def test_compile_trains_the_same_under_zero3_with_gradient_checkpointing_and_resumes(files, tmp_path):
    """--compile (DeepSpeed's engine.compile: torch.compile inside the engine): the same losses as
    eager under ZeRO-3 with gradient checkpointing, the same state dict (the export loads), and an
    exact resume from a compiled run's checkpoint."""
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        train(["--ds_config", "ds_configs/zero3.json", *common(files, "digits", "vit", out), "--max_steps", "4",
               "--micro_batch_size", "16", "--log_steps", "1", "--save_steps", "2", "--gradient_checkpointing",
               "--wandb_mode", "disabled", *flags])
        runs[name] = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
        assert (out / "model" / "model.safetensors").is_file()
    assert len(runs["eager"]) == 4 and runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    out = tmp_path / "compiled"
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    train(["--ds_config", "ds_configs/zero3.json", *common(files, "digits", "vit", out), "--max_steps", "4",
           "--micro_batch_size", "16", "--log_steps", "1", "--save_steps", "2", "--gradient_checkpointing",
           "--wandb_mode", "disabled", "--compile", "--resume", "auto"])
    assert [m["train/loss"] for m in metrics(out) if "train/loss" in m] == runs["compiled"]


def test_metrics_that_cannot_be_written_are_a_write_error_naming_the_file(tmp_path):
    from train.checkpoint import WriteError
    from train.metrics import RunLogger

    logger = RunLogger(output_dir=tmp_path, enabled=True, mode="disabled", project="p", name="n", config={},
                       run_id=None, resume_step=None)
    logger.log(1, {"train/loss": 1.0})
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # what a vanished or unwritable file looks like to open()
    with pytest.raises(WriteError, match=rf"writing {tmp_path / 'metrics.jsonl'} failed: Is a directory"):
        logger.log(2, {"train/loss": 1.0})


ENDED_SERVICE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import psutil
from train.distributed import exit_rank
from train.metrics import RunLogger

logger = RunLogger(output_dir=sys.argv[2], enabled=True, mode="offline", project="p", name="n", config={},
                   run_id=None, resume_step=None)
logger.log(1, {"train/loss": 1.0})
for child in psutil.Process().children(recursive=True):  # the launcher ends the job's every process
    child.terminate()
psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
logger.finish()
exit_rank(0)
"""


def test_a_wandb_service_ended_by_the_launcher_leaves_a_line_not_a_traceback(tmp_path):
    """The deepspeed launcher SIGTERMs every process of a job once a rank has failed, rank 0's W&B
    service too, often before rank 0 has closed its run: one line says where what was logged is,
    instead of W&B's ConnectionResetError tracebacks (at finish and from its exit hook)."""
    script = tmp_path / "ended_service.py"
    script.write_text(ENDED_SERVICE)
    done = subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    folder = re.search(r"W&B's process ended before the run was closed; what it logged until then is in (\S+)",
                       done.stderr)
    assert folder and Path(folder.group(1)).is_dir() and Path(folder.group(1)).name.startswith("offline-run-")


def test_eval_split_test_evaluates_on_the_test_shards(files, tmp_path):
    from make_shards import make_shards

    src = tmp_path / "src"
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        for c in range(4):
            for i in range(n):
                folder = src / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                photo(40 * c + 10 * ["train", "validation", "test"].index(split) + i, (48, 40)).save(folder / f"{i}.jpg")
    make_shards(src=src, out=tmp_path / "shards", progress=False)
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--data",
            str(tmp_path / "shards"), "--max_steps", "2", "--micro_batch_size", "6", "--wandb_mode", "disabled"]
    done = train(args + ["--eval_split", "test", "--export", "last"], ranks=None)
    assert "24 train / 12 test images" in done.stdout
    assert [e["eval/samples_counted"] for e in evals(out)] == [12]  # the 12 test images, not the 8 val ones
    assert json.loads((out / "run_config.json").read_text())["eval_split"] == "test"
    no_test = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "x"),
                     "--eval_split", "test", "--export", "last", "--wandb_mode", "disabled"], ranks=None, check=False)
    assert no_test.returncode == 2 and f"--eval_split test: {files['photos']} has no test samples" in no_test.stderr
    assert no_test.stderr.count("  - ") == 1  # the only problem
    # the best export chosen by the test set's top-1: only when asked for by name
    from train.args import parse_args
    from train.main import _flag_problems
    assert any(p.startswith("--eval_split test: the export would be the checkpoint with the best test top-1")
               for p in _flag_problems(parse_args(["--eval_split", "test"])))
    for given in (["--export", "last"], ["--export", "best"], ["--eval_only"]):
        problems = _flag_problems(parse_args(["--eval_split", "test", *given]))
        assert not any(p.startswith("--eval_split") for p in problems)


def test_baseline_loader_trains_on_webdataset_and_the_hf_processor(files, tmp_path):
    """--baseline_loader: the DataLoader a Hugging Face user runs, as a benchmark row."""
    out = tmp_path / "run"
    done = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "6",
                  "--micro_batch_size", "6", "--log_steps", "3", "--baseline_loader", "--record_keys",
                  "--wandb_mode", "disabled"])
    assert "train: done, 6 steps" in done.stdout
    rows = [m for m in metrics(out) if "train/loss" in m]
    assert [m["step"] for m in rows] == [3, 6] and all(math.isfinite(m["train/loss"]) for m in rows)
    assert all(0 <= m["perf/data_wait_fraction"] < 1 for m in rows)
    train_keys = {m.name.split(".")[0] for shard in (files["photos"] / "train").glob("*.tar")
                  for m in tarfile.open(shard).getmembers()}
    steps = {rank: [json.loads(line)["keys"] for line in (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    assert all(len(keys) == 6 and set(keys) <= train_keys for rank in steps for keys in steps[rank])
    assert steps[0][0] != steps[1][0]  # each rank draws its own samples
    assert json.loads((out / "run_config.json").read_text())["args"]["baseline_loader"] is True
    both = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "x"),
                  "--baseline_loader", "--synthetic_data", "--wandb_mode", "disabled"], ranks=None, check=False)
    assert both.returncode == 2 and "--synthetic_data and --baseline_loader are two stand-ins" in both.stderr


def test_profile_traces_the_steps_asked_for_on_every_rank(files, tmp_path):
    out = tmp_path / "run"
    done = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", out), "--max_steps", "6",
                  "--micro_batch_size", "6", "--profile", "2:3", "--wandb_mode", "disabled"])
    assert f"train: profile of steps 3-5 in {out / 'profile'}" in done.stdout
    for rank in (0, 1):
        events = json.loads((out / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = [e.get("name") for e in events if e.get("ph") == "X"]
        assert names.count("train_step") == 3 and names.count("data_wait") == 3, rank
        assert any(name.startswith("aten::convolution") for name in names)  # the model's own work
        assert (out / "profile" / f"rank{rank}.txt").read_text().startswith("steps 3-5, sorted by self_cpu_time_total")
    bad = train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", tmp_path / "x"),
                 "--profile", "10", "--wandb_mode", "disabled"], ranks=None, check=False)
    assert bad.returncode == 2 and "--profile 10: expected START:STEPS" in bad.stderr
