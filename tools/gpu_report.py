"""Everything the README's GPU section says, measured on this machine in one command.

    python tools/gpu_report.py [--out gpu_report] [--work DIR] [--budget 540] [--images 4000] [--steps 20]
                               [--data_threads N] [--only STEP ... | --skip STEP ...]

The steps, the figures most wanted first, each given what is left of `--budget` seconds (building
the data counts too; a step that runs out is recorded as timed out, and the report still comes):
  parity:  tools/check_parity.py --all: every processor family under every eval resize, and the
           decoder alone, against the PIL backend on 20 of the photos;
  train:   tools/benchmark_train.py: ViT-B/16 and ResNet-50 fed by DALI, by the baseline
           DataLoader and by synthetic tensors, with MFU;
  tests:   the `gpu`-marked tests;
  compile: ViT-B/16 with --compile, fed by DALI and by synthetic tensors: MFU with torch.compile;
  loader:  tools/benchmark_loader.py: the DALI loaders against the HF processor in a DataLoader,
           at batch 256 on the train split (3,600 images; the val split gives one train batch);
  profile: one DALI-fed run of each model under --profile: the operators that take the GPU's time;
  levers:  tools/benchmark_levers.py: what each input-pipeline lever is worth to ViT-B/16's training
           (the NaN guard's sync, DALI threads, the hardware JPEG decoder's share, training's
           chroma upsampling, a high-priority stream for the model);
  matrix:  ViT-B/16 under every shipped DeepSpeed config, without and with --gradient_checkpointing:
           images/s and peak GPU memory; and, from the peak memory at two micro batches (ZeRO-2),
           the largest micro batch that fits each way (a linear extrapolation, marked as such).
After every step OUT/report.md (Markdown tables) and OUT/report.json are rewritten, so a run stopped
from outside keeps the steps it finished. OUT gets only those, the loader chart and the profile
tables: the photos, shards, runs and traces stay in --work (reused by a later run), and the tables
are printed at the end. On a CPU (`--device cpu`, for testing the tool) it uses the small models
and skips the GPU tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["zero1", "zero2", "zero3", "zero3_offload"]
PROFILE_ROWS = 15  # of each profile's operator table, in the report


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


@dataclass
class Context:
    """What every step reads: the arguments, the data and models built, the budget."""

    args: argparse.Namespace
    gpu: bool
    work: Path
    data: Path
    models: list[str]
    micro: int
    steps: int
    threads: list[str]  # --data_threads for every training run, or nothing
    budget: Budget
    capacity_gib: float | None  # the GPU's memory
    port: int = 29600  # above the ports the tests take (tests/conftest.py:free_port)
    # figures of the DALI-fed runs made, by (model, config, micro batch, extra flags): a later step
    # needing the same run takes them instead of training again
    runs: dict = field(default_factory=dict)

    def next_port(self) -> int:
        self.port += 1
        return self.port


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


def outcome(done: dict, **figures) -> dict:
    """A step's entry in the report: status, seconds, its figures, and the end of stderr on failure."""
    entry = {"status": done["status"], "seconds": done.get("seconds", 0), **figures}
    if done["status"] != "ok" and not done["status"].startswith("skipped"):
        entry["error"] = _last_error(done.get("stderr", ""))
    return entry


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


def build(ctx: Context, *, images: int) -> None:
    """The ImageNet-like photos and their shards (kept in --work for a later run), the models'
    configs and processors, and the 20 photos the parity step compares on."""
    from benchmark_shards import write_imagenet_like
    from benchmark_train import MODELS
    from make_shards import make_shards
    import transformers

    if not (ctx.data / "manifest.json").exists():
        write_imagenet_like(ctx.work / "images", images)
        make_shards(src=ctx.work / "images", out=ctx.data, val_fraction=0.1, max_count=1000, progress=False,
                    overwrite=True)
    for name in ctx.models:
        config, processor, _ = MODELS[name]
        (ctx.work / f"{name}.json").write_text(json.dumps(config))
        processor(transformers).save_pretrained(ctx.work / f"{name}-processor")
    parity = ctx.work / "parity"
    if not parity.is_dir():
        parity.mkdir()
        for image in sorted((ctx.work / "images").rglob("*.jpg"))[:20]:
            (parity / image.name).write_bytes(image.read_bytes())


# --- the steps: each returns its entry in the report ----------------------------------------------

def step_parity(ctx: Context) -> dict:
    done = run([sys.executable, str(ROOT / "tools" / "check_parity.py"), "--all", "--images", str(ctx.work / "parity"),
                "--device", ctx.args.device, *([] if ctx.gpu else ["--families", "vit"])], budget=ctx.budget)
    lines = done["stdout"].strip().splitlines()
    ok = done["status"] == "ok"
    return outcome(done, table="\n".join(lines[:-1]) if ok else "", results=json.loads(lines[-1]) if ok else None)


def step_train(ctx: Context, *, models: list[str] | None = None, loaders: list[str] = (), extra: list[str] = (),
               name: str = "train") -> dict:
    entry = tabled(ctx, [sys.executable, str(ROOT / "tools" / "benchmark_train.py"), "--data", str(ctx.data),
                         "--steps", str(ctx.steps), "--micro_batch_size", str(ctx.micro), "--models",
                         *(models or ctx.models), *(["--loaders", *loaders] if loaders else []), *ctx.threads, *extra],
                   figures=ctx.work / f"{name}.json")
    for model, rows in (entry.get("results") or {}).items():
        if not extra and rows.get("dali", {}).get("images_per_sec", 0) > 0:  # (nan: not run)
            ctx.runs[(model, "zero2", ctx.micro, ())] = rows["dali"]  # benchmark_train's default config
    return entry


def tabled(ctx: Context, command: list[str], *, figures: Path) -> dict:
    """A benchmark tool's step: its Markdown table (the lines of its output that start with "|")
    and the results of the JSON it writes to `figures` (--json)."""
    figures.unlink(missing_ok=True)
    done = run([*command, "--json", str(figures)], budget=ctx.budget)
    return outcome(done, table="\n".join(l for l in done["stdout"].splitlines() if l.startswith("|")),
                   results=json.loads(figures.read_text())["results"] if figures.exists() else None)


def step_compile(ctx: Context) -> dict:
    return step_train(ctx, models=ctx.models[:1], loaders=["dali", "synthetic"], extra=["--compile"], name="compile")


def step_tests(ctx: Context) -> dict:
    if not ctx.gpu:
        return {"status": "skipped: no GPU", "seconds": 0}
    done = run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
               budget=ctx.budget)
    lines = done["stdout"].strip().splitlines()
    failed = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    return outcome(done, summary=lines[-1] if lines else "", failed=failed)


def step_loader(ctx: Context) -> dict:
    done = run([sys.executable, str(ROOT / "tools" / "benchmark_loader.py"), "--data", str(ctx.data), "--device",
                ctx.args.device, "--batch-size", str(256 if ctx.gpu else 8), "--split", "train", "--chart",
                str(ctx.args.out / "loader.png")], budget=ctx.budget)
    return outcome(done, table=[l for l in done["stdout"].splitlines() if not l.startswith("chart:")])


def step_profile(ctx: Context) -> dict:
    """One DALI-fed run per model under --profile, steps past the warm-up: the top operators by
    self GPU time (CPU time on a CPU), copied to OUT/profile-MODEL.txt."""
    first = ctx.steps // 2
    count = min(5, ctx.steps - first - 1)  # never the last step, which evaluates and saves
    if count < 1:
        return {"status": f"skipped: {ctx.steps} steps are too few to profile past the warm-up", "seconds": 0}
    entry = {"status": "ok", "seconds": 0.0, "steps": f"{first + 1}-{first + count}", "models": {}}
    start = time.monotonic()
    for name in ctx.models:
        row = train_once(ctx, name=name, micro=ctx.micro, extra=["--profile", f"{first}:{count}"])
        if row["status"] == "ok":
            row["table"] = (Path(row["output_dir"]) / "profile" / "rank0.txt").read_text()
            (ctx.args.out / f"profile-{name}.txt").write_text(row["table"])
        entry["models"][name] = row
    if any(m["status"] != "ok" for m in entry["models"].values()):
        entry["status"] = "partly failed"
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def step_levers(ctx: Context) -> dict:
    model = ctx.models[0]
    return tabled(ctx, ["deepspeed", "--num_gpus", "1", "--master_port", str(ctx.next_port()),
                        str(ROOT / "tools" / "benchmark_levers.py"), "--ds_config",
                        str(ROOT / "ds_configs" / "zero2.json"),
                        "--data", str(ctx.data), "--model_config", str(ctx.work / f"{model}.json"), "--processor",
                        str(ctx.work / f"{model}-processor"), "--micro_batch_size", str(ctx.micro), "--steps",
                        str(15 if ctx.gpu else 2), "--rounds", str(3 if ctx.gpu else 2), "--output_dir",
                        str(ctx.work / "levers"), *ctx.threads], figures=ctx.work / "levers.json")


def step_matrix(ctx: Context) -> dict:
    rows = []
    start = time.monotonic()
    for config in ctx.args.configs:  # ZeRO-1/2/3 first: offload (CPU Adam) last, should time run out
        for gc in (False, True):
            row = train_once(ctx, name=ctx.models[0], config=config, micro=ctx.micro,
                             extra=["--gradient_checkpointing"] if gc else [])
            rows.append({"config": config, "gc": gc, **row})
            print(f"gpu_report: {config}, checkpointing {'on' if gc else 'off'}: "
                  f"{row.get('images_per_sec') or 0:.1f} img/s, {row.get('gpu_mem_gib') or 0:.1f} GiB ({row['status']})",
                  flush=True)
    largest = {}
    for gc in (False, True):
        large = next((r for r in rows if r["config"] == "zero2" and r["gc"] == gc), {})
        small = (train_once(ctx, name=ctx.models[0], micro=ctx.micro // 4, extra=["--gradient_checkpointing"] if gc else [])
                 if large.get("gpu_mem_gib") else {})
        largest["on" if gc else "off"] = largest_micro(small, large, (ctx.micro // 4, ctx.micro), ctx.capacity_gib)
    failed = [r for r in rows if r["status"] != "ok"]
    return {"status": "ok" if not failed else f"{len(failed)} of {len(rows)} runs not ok",
            "seconds": round(time.monotonic() - start, 1), "model": ctx.models[0], "micro": ctx.micro, "rows": rows,
            "largest_micro": largest}


STEPS = {"parity": step_parity, "train": step_train, "tests": step_tests, "compile": step_compile,
         "loader": step_loader, "profile": step_profile, "levers": step_levers, "matrix": step_matrix}


def train_once(ctx: Context, *, name: str, micro: int, config: str = "zero2", extra: list[str] = ()) -> dict:
    """benchmark_train's DALI-fed run of model `name` under `config`, within the budget: its status
    and figures."""
    from benchmark_train import MODELS, RunFailed, run_training

    if (made := ctx.runs.get((name, config, micro, tuple(extra)))) is not None:
        return {"status": "ok", "seconds": 0.0, **made, "made_by": "the train step (the same run)"}
    if ctx.budget.left() < 5:
        return {"status": "skipped: no time left"}
    start = time.monotonic()
    try:
        figures = run_training(data=ctx.data, work=ctx.work, name=name, config=config, steps=ctx.steps, micro=micro,
                               port=ctx.next_port(), extra=[*(MODELS[name][2] if ctx.gpu else []), *ctx.threads, *extra],
                               timeout=ctx.budget.left())
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


# --- the report -----------------------------------------------------------------------------------

TITLES = {"parity": "Eval parity with the PIL backend (tools/check_parity.py --all)",
          "train": "Training (tools/benchmark_train.py)", "tests": "gpu-marked tests",
          "compile": "Training with --compile (tools/benchmark_train.py)",
          "loader": "Loader (tools/benchmark_loader.py)", "profile": "Profile (train/main.py --profile)",
          "levers": "Levers (tools/benchmark_levers.py)", "matrix": "DeepSpeed configs and gradient checkpointing"}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU report: {m.get('gpu', 'CPU')} x{m.get('gpus', 0)}", "",
             f"torch {m['torch']}, DALI {m['dali']}, DeepSpeed {m['deepspeed']}, transformers {m['transformers']}, "
             f"{m['cpus']} CPU cores, TORCH_CUDA_ARCH_LIST={m['TORCH_CUDA_ARCH_LIST']}; {report['images']} images, "
             f"{report['steps']} steps per run; {report['seconds']:.0f} s so far"]
    for name, entry in report["results"].items():
        lines += ["", f"## {TITLES[name]}", "", f"status: {entry['status']} ({entry.get('seconds', 0):.0f} s)"
                  + (f"; {entry['error']}" if entry.get("error") else ""), ""]
        lines += SECTIONS.get(name, _table_section)(entry)
    return "\n".join(lines) + "\n"


def _table_section(entry: dict) -> list[str]:
    return [entry["table"]] if entry.get("table") else []


def _tests_section(entry: dict) -> list[str]:
    return [entry.get("summary", ""), *entry.get("failed", [])]


def _loader_section(entry: dict) -> list[str]:
    return ["```", *entry["table"], "```"] if entry.get("table") else []


def _profile_section(entry: dict) -> list[str]:
    lines = []
    for name, model in entry.get("models", {}).items():
        lines += [f"{name}, steps {entry['steps']}: {model['status']}", ""]
        if model.get("table"):
            lines += ["```", *model["table"].splitlines()[:PROFILE_ROWS + 4], "```", ""]
    return lines


def _matrix_section(entry: dict) -> list[str]:
    lines = [f"{entry['model']}, micro batch {entry['micro']}, 1 GPU", "",
             "| config | checkpointing | img/s | peak GPU memory (GiB) | MFU | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in entry["rows"]:
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        mem = f"{row['gpu_mem_gib']:.1f}" if row.get("gpu_mem_gib") else "-"
        ips = f"{row['images_per_sec']:.1f}" if row.get("images_per_sec") else "-"
        lines.append(f"| {row['config']} | {'on' if row['gc'] else 'off'} | {ips} | {mem} | {mfu} | {row['status']} |")
    lines += ["", "Largest micro batch (ZeRO-2, peak memory extrapolated linearly from two micro batches to 95% of "
              "the device):", ""]
    lines += [f"- checkpointing {gc}: {value if value is not None else 'not measured'}"
              for gc, value in entry["largest_micro"].items()]
    return lines


SECTIONS = {"tests": _tests_section, "loader": _loader_section, "profile": _profile_section, "matrix": _matrix_section}


def write_report(report: dict, out: Path, started: float) -> None:
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report"), help="report.md, report.json, charts, tables")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_report-work",
                        help="photos, shards, runs and traces (reused when it holds shards)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="ImageNet-like JPEGs to shard (default 4000 on GPU, 200 on CPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default 20 on GPU, 10 on CPU)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--data_threads", type=int, help="DALI threads per rank in every training run (default: "
                                                         "the trainer's)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--only", nargs="+", choices=list(STEPS), help="these steps alone (in the usual order)")
    chosen.add_argument("--skip", nargs="+", default=[], choices=list(STEPS))
    args = parser.parse_args(argv)
    budget, started = Budget(args.budget), time.monotonic()
    sys.path.insert(0, str(ROOT / "tools"))
    gpu = args.device == "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(gpu), "images": args.images or (4000 if gpu else 200),
              "steps": args.steps or (20 if gpu else 10), "results": {}}
    ctx = Context(args=args, gpu=gpu, work=args.work, data=args.work / "shards",
                  models=["vit-b16", "resnet-50"] if gpu else ["vit-tiny"], micro=256 if gpu else 4,
                  steps=report["steps"], threads=["--data_threads", str(args.data_threads)] if args.data_threads else [],
                  budget=budget, capacity_gib=report["machine"].get("gpu_memory_gib"))
    print(f"gpu_report: {report['machine'].get('gpu', 'CPU')}; data and models in {args.work}", flush=True)
    build(ctx, images=report["images"])
    for name, step in STEPS.items():
        if name in args.skip or (args.only and name not in args.only):
            continue
        print(f"gpu_report: {name} ({budget.left():.0f} s left)", flush=True)
        report["results"][name] = step(ctx)
        entry = report["results"][name]
        print(f"gpu_report: {name} {entry['status']} in {entry.get('seconds', 0):.0f} s"
              + (f": {entry['error']}" if entry.get("error") else ""), flush=True)
        write_report(report, args.out, started)
    write_report(report, args.out, started)
    print("\n" + markdown(report))
    print(f"gpu_report: {args.out / 'report.md'} and report.json ({report['seconds']:.0f} s)")
    return 0


def _last_error(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if re.search(r"Error|error:|Traceback", l)]
    return (lines[-1] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "")[:300]


if __name__ == "__main__":
    sys.exit(main())
