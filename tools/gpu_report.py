"""Everything the README's GPU section says, measured on this machine in one command.

    python tools/gpu_report.py [--out gpu_report] [--budget 560] [--images 4000] [--steps 20] [--data_threads N]

In order, each step given what is left of `--budget` seconds (a step that runs out is recorded as
timed out, and the report still comes):
  1. the machine: GPU, memory, versions, TORCH_CUDA_ARCH_LIST;
  2. the `gpu`-marked tests;
  3. tools/check_parity.py --all: every processor family under every eval resize, and the decoder
     alone, against the PIL backend on 20 of the photos;
  4. tools/benchmark_loader.py: the DALI loaders against the HF processor in a DataLoader;
  5. tools/benchmark_train.py: ViT-B/16 and ResNet-50 fed by DALI, by the baseline DataLoader and
     by synthetic tensors, with MFU;
  6. tools/benchmark_levers.py: what each input-pipeline lever is worth to ViT-B/16's training
     (the NaN guard's sync, DALI threads, the hardware JPEG decoder's share, training's chroma
     upsampling, a high-priority stream for the model);
  7. ViT-B/16 under every shipped DeepSpeed config, without and with --gradient_checkpointing:
     images/s and peak GPU memory; and, from the peak memory at two micro batches (ZeRO-2), the
     largest micro batch that fits each way (a linear extrapolation, marked as such).
Writes OUT/report.md (Markdown tables) and OUT/report.json. On a CPU (`--device cpu`, for testing
the tool) it uses the small models and skips the GPU tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["zero1", "zero2", "zero3", "zero3_offload"]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def run(command: list[str], *, budget: Budget, cwd: Path = ROOT) -> dict:
    """A step's command under what is left of the budget: its output, status and duration."""
    start = time.monotonic()
    if budget.left() < 5:
        return {"status": "skipped: no time left", "seconds": 0.0, "stdout": "", "stderr": ""}
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=budget.left())
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "stdout": stdout, "stderr": stderr[-4000:]}


def machine(gpu: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
            "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    for name in ("nvidia.dali", "deepspeed", "transformers"):
        try:
            info[name.split(".")[-1]] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            info[name.split(".")[-1]] = None
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    return info


def train_once(*, data: Path, work: Path, model: str, config: str, micro: int, steps: int, gc: bool,
               budget: Budget, port: int, extra: list[str]) -> dict:
    """benchmark_train's run of `model` under `config`, within the budget: its figures and status."""
    from benchmark_train import RunFailed, run_training

    if budget.left() < 5:
        return {"status": "skipped: no time left"}
    start = time.monotonic()
    try:
        figures = run_training(data=data, work=work, name=model, config=config, steps=steps, micro=micro, port=port,
                               extra=[*extra, *(["--gradient_checkpointing"] if gc else [])], timeout=budget.left())
        status = "ok"
    except RunFailed as e:
        figures, status = {"error": _last_error(str(e))}, str(e).splitlines()[0].rstrip(":")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), **figures}


def largest_micro(small: dict, large: dict, micros: tuple[int, int], capacity_gib: float | None) -> int | None:
    """The micro batch at which the peak memory, linear in the micro batch through the two runs,
    reaches 95% of the device's memory."""
    if capacity_gib is None or not small.get("gpu_mem_gib") or not large.get("gpu_mem_gib"):
        return None
    slope = (large["gpu_mem_gib"] - small["gpu_mem_gib"]) / (micros[1] - micros[0])
    if slope <= 0:
        return None
    return int((0.95 * capacity_gib - small["gpu_mem_gib"]) / slope + micros[0])


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU report: {m.get('gpu', 'CPU')} x{m.get('gpus', 0)}", "",
             f"torch {m['torch']}, DALI {m['dali']}, DeepSpeed {m['deepspeed']}, transformers {m['transformers']}, "
             f"{m['cpus']} CPU cores, TORCH_CUDA_ARCH_LIST={m['TORCH_CUDA_ARCH_LIST']}; "
             f"{report['seconds']:.0f} s in all", ""]
    tests = report["tests"]
    lines += ["## gpu-marked tests", "", f"{tests['status']}: {tests.get('summary', '')} ({tests['seconds']} s)", ""]
    parity = report["parity"]
    lines += ["## Eval parity with the PIL backend (tools/check_parity.py --all)", "", f"status: {parity['status']}", "",
              parity.get("table", ""), ""]
    loader = report["loader"]
    lines += ["## Loader (tools/benchmark_loader.py)", "", f"status: {loader['status']}", "", "```",
              *loader.get("table", []), "```", ""]
    lines += ["## Training (tools/benchmark_train.py)", "", f"status: {report['train']['status']}", "",
              report["train"].get("table", ""), ""]
    levers = report["levers"]
    lines += ["## Levers (tools/benchmark_levers.py)", "", f"status: {levers['status']}", "",
              levers.get("table", ""), ""]
    lines += ["## DeepSpeed configs and gradient checkpointing", "",
              f"{report['matrix_model']}, micro batch {report['matrix_micro']}, {report['steps']} steps, 1 GPU", "",
              "| config | checkpointing | img/s | peak GPU memory (GiB) | MFU | status |", "| --- | --- | --- | --- | --- | --- |"]
    for row in report["matrix"]:
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        mem = f"{row['gpu_mem_gib']:.1f}" if row.get("gpu_mem_gib") else "-"
        ips = f"{row['images_per_sec']:.1f}" if row.get("images_per_sec") else "-"
        lines.append(f"| {row['config']} | {'on' if row['gc'] else 'off'} | {ips} | {mem} | {mfu} | {row['status']} |")
    lines += ["", "Largest micro batch (ZeRO-2, peak memory extrapolated linearly from two micro batches to 95% of "
              "the device):", ""]
    for gc, value in report["largest_micro"].items():
        lines.append(f"- checkpointing {gc}: {value if value is not None else 'not measured'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report"))
    parser.add_argument("--budget", type=float, default=560, help="seconds for everything")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="ImageNet-like JPEGs to shard (default 4000 on GPU, 200 on CPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default 20 on GPU, 10 on CPU)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--data_threads", type=int, help="DALI threads per rank in every training run (default: "
                                                         "the trainer's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "parity", "loader", "train", "levers",
                                                                  "matrix"])
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark_shards import write_imagenet_like
    from benchmark_train import MODELS
    from make_shards import make_shards
    import transformers

    budget, started = Budget(args.budget), time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    images, steps = args.images or (4000 if gpu else 200), args.steps or (20 if gpu else 10)
    micro, models = (256, ["vit-b16", "resnet-50"]) if gpu else (4, ["vit-tiny"])
    threads = ["--data_threads", str(args.data_threads)] if args.data_threads else []
    report = {"machine": machine(gpu), "steps": steps, "matrix_model": models[0], "matrix_micro": micro}
    print(f"gpu_report: {report['machine'].get('gpu', 'CPU')}; building {images} images", flush=True)
    if not (work / "shards" / "manifest.json").exists():
        write_imagenet_like(work / "images", images)
        make_shards(src=work / "images", out=work / "shards", val_fraction=0.1, max_count=1000, progress=False,
                    overwrite=True)
    data = work / "shards"
    for name in models:
        config, processor, _ = MODELS[name]
        (work / f"{name}.json").write_text(json.dumps(config))
        processor(transformers).save_pretrained(work / f"{name}-processor")

    tests = {"status": "skipped"} if "tests" in args.skip or not gpu else run(
        [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"], budget=budget)
    tests["summary"] = (tests.get("stdout", "").strip().splitlines() or [""])[-1]
    report["tests"] = {k: v for k, v in tests.items() if k not in ("stdout", "stderr")} | {"seconds": tests.get("seconds", 0)}
    print(f"gpu_report: tests {report['tests']['status']} {report['tests']['summary']}", flush=True)

    parity_dir = work / "parity"
    if not parity_dir.is_dir():
        parity_dir.mkdir()
        for image in sorted((work / "images").rglob("*.jpg"))[:20]:
            (parity_dir / image.name).write_bytes(image.read_bytes())
    parity = {"status": "skipped"} if "parity" in args.skip else run(
        [sys.executable, str(ROOT / "tools" / "check_parity.py"), "--all", "--images", str(parity_dir), "--device",
         args.device, *([] if gpu else ["--families", "vit"])], budget=budget)
    lines = parity.get("stdout", "").strip().splitlines()
    report["parity"] = {"status": parity["status"], "seconds": parity.get("seconds", 0),
                        "table": "\n".join(lines[:-1]) if parity["status"] == "ok" else "",
                        "results": json.loads(lines[-1]) if parity["status"] == "ok" else None}
    print(f"gpu_report: parity {parity['status']}", flush=True)

    loader = {"status": "skipped"} if "loader" in args.skip else run(
        [sys.executable, str(ROOT / "tools" / "benchmark_loader.py"), "--data", str(data), "--device", args.device,
         "--batch-size", str(256 if gpu else 32), "--chart", str(args.out / "loader.png")], budget=budget)
    report["loader"] = {"status": loader["status"], "seconds": loader.get("seconds", 0),
                        "table": [l for l in loader.get("stdout", "").splitlines() if not l.startswith("chart:")]}
    print(f"gpu_report: loader {loader['status']}", flush=True)

    train_json = args.out / "train.json"
    train = {"status": "skipped"} if "train" in args.skip else run(
        [sys.executable, str(ROOT / "tools" / "benchmark_train.py"), "--data", str(data), "--steps", str(steps),
         "--micro_batch_size", str(micro), "--models", *models, "--json", str(train_json), *threads], budget=budget)
    report["train"] = {"status": train["status"], "seconds": train.get("seconds", 0),
                       "table": "\n".join(l for l in train.get("stdout", "").splitlines() if l.startswith("|")),
                       "results": json.loads(train_json.read_text())["results"] if train_json.exists() else None}
    print(f"gpu_report: train {train['status']}", flush=True)

    levers_json, port = args.out / "levers.json", 29600
    levers = {"status": "skipped"} if "levers" in args.skip else run(
        ["deepspeed", "--num_gpus", "1", "--master_port", str(port), str(ROOT / "tools" / "benchmark_levers.py"),
         "--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--data", str(data),
         "--model_config", str(work / f"{models[0]}.json"), "--processor", str(work / f"{models[0]}-processor"),
         "--micro_batch_size", str(micro), "--steps", str(15 if gpu else 2), "--rounds", str(3 if gpu else 2),
         "--output_dir", str(work / "levers"), "--json", str(levers_json), *threads], budget=budget)
    report["levers"] = {"status": levers["status"], "seconds": levers.get("seconds", 0),
                        "table": "\n".join(l for l in levers.get("stdout", "").splitlines() if l.startswith("|")),
                        "results": json.loads(levers_json.read_text())["results"] if levers_json.exists() else None}
    print(f"gpu_report: levers {levers['status']}", flush=True)

    matrix = []
    if "matrix" not in args.skip:
        for config in args.configs:  # ZeRO-1/2/3 first: offload (CPU Adam) last, should time run out
            for gc in (False, True):
                port += 1
                row = train_once(data=data, work=work, model=models[0], config=config, micro=micro, steps=steps, gc=gc,
                                 budget=budget, port=port, extra=threads)
                matrix.append({"config": config, "gc": gc, **row})
                print(f"gpu_report: {config}, checkpointing {'on' if gc else 'off'}: "
                      f"{row.get('images_per_sec') or 0:.1f} img/s, {row.get('gpu_mem_gib') or 0:.1f} GiB ({row['status']})",
                      flush=True)
    report["matrix"] = matrix
    capacity = report["machine"].get("gpu_memory_gib")
    report["largest_micro"] = {}
    for gc in (False, True):
        large = next((r for r in matrix if r["config"] == "zero2" and r["gc"] == gc), {})
        small = {}
        if large.get("gpu_mem_gib") and "matrix" not in args.skip:
            port += 1
            small = train_once(data=data, work=work, model=models[0], config="zero2", micro=micro // 4, steps=steps,
                               gc=gc, budget=budget, port=port, extra=threads)
        report["largest_micro"]["on" if gc else "off"] = largest_micro(small, large, (micro // 4, micro), capacity)
    report["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(f"gpu_report: {args.out / 'report.md'} and report.json ({report['seconds']:.0f} s)")
    return 0


def _last_error(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if re.search(r"Error|error:|Traceback", l)]
    return (lines[-1] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "")[:300]


if __name__ == "__main__":
    sys.exit(main())
