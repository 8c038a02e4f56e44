"""The GPU report tool, run as on a GPU box but on the CPU (small model, one config): every step
it runs leaves its figures in report.json and report.md."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time

from conftest import ROOT, common, launcher


def test_gpu_report_on_cpu_writes_the_tables(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    command = [sys.executable, str(ROOT / "tools" / "gpu_report.py"), "--device", "cpu", "--out", str(out), "--work",
               str(work), "--configs", "zero2", "--skip", "compile", "--images", "120", "--data_threads", "2"]
    log, errors = tmp_path / "stdout", tmp_path / "stderr"
    with open(log, "w") as stdout, open(errors, "w") as stderr:
        job = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
    seen = []  # the steps in report.json, each time it changed: rewritten after every step
    while job.poll() is None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            steps = list(json.loads((out / "report.json").read_text())["results"])
            if not seen or steps != seen[-1]:
                seen.append(steps)
        time.sleep(0.2)
    assert job.returncode == 0, errors.read_text()[-3000:]
    report = json.loads((out / "report.json").read_text())
    done = ["parity", "train", "tests", "loader", "profile", "levers", "matrix"]
    assert list(report["results"]) == done
    # seen growing step by step (the GPU tests step, instant here, may come with train)
    assert seen[0] == ["parity"] and len(seen) >= 4 and all(steps == done[:len(steps)] for steps in seen), seen
    results = report["results"]
    assert report["machine"]["torch"] and results["tests"]["status"] == "skipped: no GPU"
    trained = results["train"]["results"]["vit-tiny"]
    assert set(trained) == {"dali", "baseline", "synthetic"}
    assert all(r["images_per_sec"] > 0 and 0 <= r["data_wait"] < 1 for r in trained.values())
    matrix = results["matrix"]
    assert [(r["config"], r["gc"], r["status"]) for r in matrix["rows"]] == [("zero2", False, "ok"), ("zero2", True, "ok")]
    assert all(r["images_per_sec"] > 0 for r in matrix["rows"])
    # the ZeRO-2 row without checkpointing is the train step's DALI run (the same command): not trained twice
    made, again = matrix["rows"][0], matrix["rows"][1]
    assert made["made_by"] == "the train step (the same run)"
    assert made["images_per_sec"] == trained["dali"]["images_per_sec"]
    assert "made_by" not in again and again["seconds"] > 0
    assert matrix["largest_micro"] == {"off": None, "on": None}  # no GPU memory to measure on a CPU
    # the lever table (tools/benchmark_levers.py): every CPU variant in every round, against its ceiling
    assert results["levers"]["status"] == "ok"
    levers = results["levers"]["results"]
    assert list(levers) == ["synthetic", "synthetic, nan_guard stop", "dali", "dali, nan_guard stop",
                            "synthetic, ema_decay 0.9998", "dali, 1 threads (not 2)"]
    assert levers["synthetic, ema_decay 0.9998"]["ceiling"] == "synthetic"  # what the weight average costs
    assert all(len(r["runs"]) == 2 and r["images_per_sec"] > 0 and 0 <= r["data_wait_fraction"] < 1
               for r in levers.values())
    assert levers["dali, nan_guard stop"]["ceiling"] == "synthetic, nan_guard stop"
    assert levers["dali"]["share_of_ceiling"] == levers["dali"]["images_per_sec"] / levers["synthetic"]["images_per_sec"]
    assert results["parity"]["status"] == "ok" and list(results["parity"]["results"]["families"]) == ["vit"]
    assert results["parity"]["results"]["families"]["vit"]["pillow"]["max"] == 0  # on CPU: Pillow's pixels exactly
    # the loader table, timed on the train split (108 images: 13 batches of 8, every loader)
    loader = results["loader"]
    assert loader["status"] == "ok", loader
    rates = {line[:48].strip(): float(line[48:58]) for line in loader["table"][2:]}
    assert list(rates) == ["HF processor DataLoader", "DALI eval loader, dali resize", "DALI eval loader, torch resize",
                           "DALI eval loader, pillow resize", "DALI train loader", "DALI eval graph alone",
                           "DALI train graph alone"] and all(rate > 0 for rate in rates.values())
    # the profile: steps past the warm-up and before the last (which evaluates and saves), by operator
    profile = results["profile"]
    assert profile["status"] == "ok" and profile["steps"] == "6-9"
    table = (out / "profile-vit-tiny.txt").read_text()
    assert table.startswith("steps 6-9, sorted by self_cpu_time_total") and "train_step" in table
    assert "aten::" in table and profile["models"]["vit-tiny"]["table"] == table
    # OUT holds the report alone (it comes back from a lent GPU machine, a few files at most); the
    # data, runs and traces stay in --work
    assert sorted(p.name for p in out.iterdir()) == ["loader.png", "profile-vit-tiny.txt", "report.json", "report.md"]
    assert (work / "shards" / "manifest.json").is_file() and list(work.rglob("rank0.json"))
    markdown = (out / "report.md").read_text()
    assert "| vit-tiny | " in markdown and "| zero2 | on | " in markdown and "| dali, 1 threads (not 2) | " in markdown
    assert markdown.split("\n", 1)[1] in log.read_text()  # the tables are printed too


def test_benchmark_levers_never_clears_a_folder_holding_checkpoints(files, tmp_path):
    """(Its lever table is checked through gpu_report above.) A folder holding a run's checkpoints
    is refused by name, never cleared."""
    kept = tmp_path / "run" / "checkpoints" / "step-00000002"
    kept.mkdir(parents=True)
    (kept / "complete.json").write_text("{}")
    refused = subprocess.run(launcher(ranks=1)[:-1] + [str(ROOT / "tools" / "benchmark_levers.py"),
                             *common(files, "photos", "vit", tmp_path / "run"), "--ds_config", "ds_configs/zero2.json"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode == 2 and "holds checkpoints of an earlier run" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and (kept / "complete.json").is_file()


def test_benchmark_loader_times_the_other_batched_arithmetic_and_puts_the_default_back(files):
    """benchmark_loader's GPU rows, run on the CPU (where they time the same image-by-image resizes)."""
    from benchmark_loader import other_arithmetic
    from transformers import ViTImageProcessorPil

    from pipelines import resize
    from pipelines.spec import spec_from_processor

    rows = other_arithmetic(dict(data=files["photos"], split="val", spec=spec_from_processor(ViTImageProcessorPil()),
                                 batch_size=4, num_threads=1, device="cpu"), batches=4)
    assert list(rows) == ["DALI eval loader, torch resize, float32 bytes", "DALI eval loader, pillow resize, float32 bytes"]
    assert all(rate > 0 for rate in rows.values()) and resize.FLOAT64 is None


def test_soak_kill_rule_wants_every_rank_to_say_why_and_the_killed_ranks_node_to_name_it():
    """tools/soak.py's rule for a launch whose rank was killed outright (TRAIN_FAIL_AT=R:S:kill),
    on the lines train/main.py prints (tests/test_resume.py checks those): it holds for the output
    of one node and of two, and each of its checks can fail."""
    from soak import kill_problem

    def named(k: int, dead: int) -> str:
        return (f"train: rank {k}: stopping: rank {dead}'s process (pid 42) was killed by SIGKILL at step 5 "
                f"(out of memory? the kernel's OOM killer sends SIGKILL: `dmesg` on this node)")

    one = f"{named(0, 1)}\n{named(2, 1)}"
    assert kill_problem(247, one, rank=1, step=5, ranks=3, nodes=1) is None
    assert kill_problem(1, one, rank=1, step=5, ranks=3, nodes=1) is None
    # two nodes: rank 0 (node 0) lost rank 2 (node 1) first, with its collective's traceback
    two = ("train: rank 0: failed at step 5 (the traceback follows); rank 2 did not answer within 2.5 s: its "
           "process ended or hangs, on another node\nTraceback (most recent call last):\n"
           "train: rank 1: stopping: rank 0 failed at step 5: RuntimeError: closed\n"
           "train: rank 3: stopping: rank 0 failed at step 5: RuntimeError: closed (here then: rank 2's process "
           "(pid 42) was killed by SIGKILL)")
    assert kill_problem(247, two, rank=2, step=5, ranks=4, nodes=2) is None
    assert "exit 0" in kill_problem(0, one, rank=1, step=5, ranks=3, nodes=1)
    assert "silent ranks [2]" in kill_problem(247, named(0, 1), rank=1, step=5, ranks=3, nodes=1)
    assert "not naming it [3]" in kill_problem(247, two.split(" (here then")[0], rank=2, step=5, ranks=4, nodes=2)
    assert "failed [0]" in kill_problem(247, two, rank=1, step=5, ranks=4, nodes=2)  # rank 0 shares rank 1's node
    assert "not naming it [0]" in kill_problem(247, two.replace("; rank 2 did not answer", ""), rank=2, step=5,
                                               ranks=4, nodes=2)
    assert "2 tracebacks" in kill_problem(247, one + "\nTraceback (most recent call last):" * 2, rank=1, step=5,
                                          ranks=3, nodes=1)
    assert kill_problem(-9, "", rank=0, step=5, ranks=1, nodes=1) is None
    assert kill_problem(1, "", rank=0, step=5, ranks=1, nodes=1) is not None


def test_soak_trial_resumed_on_other_ranks_holds_every_rule(tmp_path):
    """tools/soak.py, one trial (seed 13: a ResNet on 3 ranks stops at a random step, 2 ranks as two
    nodes of this machine go on with RandAugment to 2 epochs of 1,618 digits, evaluating every 13
    steps and saving every 7, and a NaN on rank 1 at step 100 skips that step; its export evaluated
    on 3 ranks in batches of 7): every rule holds, and its checks can fail."""
    from soak import check, export_eval_problems, final_epochs

    from train.checkpoint import complete_checkpoints

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), "--trials", "1", "--seed", "13",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "soak: 1 of 1 trials held every rule" in done.stdout
    [result] = json.loads((tmp_path / "soak.json").read_text())
    assert result["launches"] == [[3, 13, 1], [2, 13, 1]] and result["nodes"] == [1, 2]
    assert (result["eval_steps"], result["save_steps"], result["keep"], result["export"]) == (13, 7, 2, "best")
    assert final_epochs(result) == 2.0 and final_epochs({**result, "changes": [[], ["--epochs", "2.5"]]}) == 2.5
    assert len(result["stops"]) == 1 and result["problems"] == []
    assert result["nans"] == [{"step": 100, "launch": 2, "skipped": True}] and result["eval_only"] == [3, 7]
    output = (tmp_path / "trial-13-0.launch2.node0.log").read_text()
    assert "train: 2 rank(s)" in output
    trial = tmp_path / "trial-13-0"
    assert check(trial, result, result["stops"], result["steps"], output=output) == []
    assert check(trial, result, result["stops"], result["steps"], output="")[0].startswith("exported nothing, expected step")
    # had the last launch branched from the step before the last, finding no checkpoint there, only
    # the last step's would be left
    branched = {**result, "branches": [{"launch": 2, "from": result["steps"] - 1, "present": []}]}
    assert check(trial, branched, result["stops"], result["steps"])[0].startswith("checkpoints left at steps")
    assert f"expected [{result['steps']}]" in check(trial, branched, result["stops"], result["steps"])[0]
    # a step skipped for a NaN that the run did not inject
    assert check(trial, {**result, "nans": []}, result["stops"], result["steps"], output=output) == [
        "steps logged without a train/loss [100], NaN-skipped steps []", "train/skipped_steps 1.0 at the end, 0 skipped"]
    # a sample read twice in epoch 1, and a step logged twice
    log = trial / "sample_keys" / "rank0.jsonl"
    first, second, *rest = [json.loads(line) for line in log.read_text().splitlines()]
    second["keys"][0] = first["keys"][0]
    log.write_text("".join(json.dumps(record) + "\n" for record in (first, second, *rest)))
    assert check(trial, result, result["stops"], result["steps"]) == ["epoch 1: 1 samples read twice"]
    assert check(trial, result, result["stops"], result["steps"] + 1)[0].startswith(
        f"steps logged: {result['steps']} ")
    # the newest checkpoint removed: what is left breaks the pruning rule
    kept = complete_checkpoints(trial / "checkpoints")[0]
    assert len(kept) >= 2
    shutil.rmtree(kept[-1])
    assert any(p.startswith("checkpoints left at steps") for p in check(trial, result, result["stops"], result["steps"]))
    # --eval_only of the export: a prediction lost, and another top-1 than the run's eval of its step
    step = int(re.search(r"\(from step-(\d+), ", output).group(1))
    assert export_eval_problems(trial, step=step, ranks=3) == []
    predictions = trial / "eval_only" / "predictions.jsonl"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[1:]))
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update({"eval/top1": row["eval/top1"] / 2} if row["step"] == step and "eval/top1" in row else {})
    (trial / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    problems = export_eval_problems(trial, step=step, ranks=3)
    assert problems[0] == "--eval_only on 3 rank(s): 179 samples, 178 predictions, 178 keys, of 179"
    assert problems[1].startswith(f"--eval_only of the export (step {step}) on 3 rank(s): top-1 ")
