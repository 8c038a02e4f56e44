"""What the hardware does with a run: model FLOPs, MFU, and DeepSpeed's op builds.

MFU is the model's FLOPs per second (forward and backward of the images trained, counted once at
start with torch's FLOP counter; recomputation by gradient checkpointing not included) over the
device's dense peak for the training precision.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Dense (no sparsity) peak TFLOP/s per GPU, from the vendors' data sheets: {name pattern: {precision: peak}}.
# fp32 is the plain FP32 rate (TF32 tensor cores are used only where torch is told to allow them).
PEAK_TFLOPS = {
    r"H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    r"H100.*(PCIe|PCI-E)": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    r"H100.*NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    r"H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM
    r"A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    r"L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    r"\bL4\b": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    r"\bA10\b": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    # no native bf16 (--precision auto picks fp16 there): no bf16 peak, so no MFU for emulated bf16
    r"V100S": {"fp16": 130.0, "fp32": 16.4},
    r"V100.*PCIE": {"fp16": 112.0, "fp32": 14.0},
    r"V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2
    r"\bT4\b": {"fp16": 65.0, "fp32": 8.1},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of a GPU (by its torch name, e.g. "NVIDIA H100 80GB HBM3") for a precision;
    None for a device or precision not in the table (and for CPUs): pass --peak_tflops."""
    for pattern, peaks in PEAK_TFLOPS.items():
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


def train_flops_per_image(model: torch.nn.Module, *, image_size: tuple[int, int], num_classes: int) -> float:
    """FLOPs of one forward and backward pass per image, counted by torch on a batch of two
    (batch-independent work, if any, is not counted twice). Leaves the model as it found it:
    gradients cleared, buffers (BatchNorm statistics and counts) restored."""
    from torch.utils.flop_counter import FlopCounterMode

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    parameter = next(model.parameters())
    pixels = torch.zeros(2, 3, *image_size, dtype=parameter.dtype, device=parameter.device)
    labels = torch.zeros(2, dtype=torch.long, device=parameter.device) % num_classes
    # torch's counter sees the matmuls of eager attention, not every fused SDPA kernel (on CPU it
    # counts none): the model's FLOPs are the same whichever kernel runs them
    config, attention = getattr(model, "config", None), getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention is not None:
        config._attn_implementation = "eager"
    try:
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(pixel_values=pixels).logits.float(), labels).backward()
    finally:
        if attention is not None:
            config._attn_implementation = attention
    model.zero_grad(set_to_none=True)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    model.train(was_training)
    return counter.get_total_flops() / 2


@contextlib.contextmanager
def deepspeed_arch_list():
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19's op builder can parse it, for the build only.

    Hopper images set entries such as `9.0a` (arch-specific features) and Blackwell ones `10.0f`;
    DeepSpeed's JIT builder reads each minor version with `int()` and crashes on them (its fused
    Adam is built inside `deepspeed.initialize`). The builder is handed the plain `9.0`, `10.0`
    (its kernels use no arch-specific features); the user's value is back afterwards.
    """
    original = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if original is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = parseable_arch_list(original)
    try:
        yield
    finally:
        if original is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = original


def parseable_arch_list(value: str) -> str:
    """`9.0a;8.0 9.0+PTX 10.0f` -> `9.0;8.0;9.0+PTX;10.0`: suffixes other than +PTX dropped."""
    entries = []
    for entry in value.replace(" ", ";").split(";"):
        if match := re.fullmatch(r"(\d+)\.(\d+)[a-z]*(\+PTX)?", entry.strip()):
            entry = f"{match[1]}.{match[2]}{match[3] or ''}"
        if entry.strip() and entry not in entries:
            entries.append(entry)
    return ";".join(entries)


@contextlib.contextmanager
def cpu_info_once():
    """py-cpuinfo's answer asked for once per kind of machine, not twice per rank and run.

    DeepSpeed's CPU op builders (the fused Adam of a CPU accelerator, the CPU Adam of ZeRO-Offload)
    call `cpuinfo.get_cpu_info()` to pick their -march and SIMD flags each time they load, built or
    not: two or three calls in `deepspeed.initialize`, each a new Python interpreter that forks
    again (measured: 2.3 s of CPU of a one-rank run's 16 s start on 2 cores). Inside this
    context the answer is read from the extension build root, kept there by the first call under
    a name made from this CPU's model and flags (a home folder shared by unlike machines keeps one
    for each kind); anything unreadable asks py-cpuinfo as before.
    """
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu
        yield
        return
    original = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = functools.cache(lambda: _kept_cpu_info(original))
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = original


def _kept_cpu_info(ask) -> dict:
    if (kind := cpu_kind()) is None:
        return ask()
    from torch.utils.cpp_extension import get_default_build_root

    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / f"cpuinfo-{kind}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    info = ask()
    if info:  # py-cpuinfo answers {} when its process failed: asked again next time
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(info))
            os.replace(partial, path)
        except OSError:  # a full disk, a read-only home: asked again next time
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
    return info


CPU_KIND_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags",  # x86
                   "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")  # Arm


def cpu_kind() -> str | None:
    """A digest of what identifies this machine's CPU in /proc/cpuinfo (not its clock, which
    moves); None where it cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in CPU_KIND_FIELDS:
            fields.setdefault(key.strip(), value.strip())
    if not fields:
        return None
    text = json.dumps([platform.machine(), sorted(fields.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def defer_muon_compile() -> None:
    """Imports DeepSpeed's Muon kernels with their torch.compile put off to their first call.

    Every ZeRO engine imports DeepSpeed's Muon optimizer (to check whether the optimizer is one,
    and again in ZeRO-1/2's every step), whose kernels are decorated with torch.compile at import;
    torch.compile's first use imports inductor: measured 1.6 s of CPU per rank of a 10-s start (2
    cores), for a run that never uses Muon. Decorated here with a wrapper that calls torch.compile,
    with DeepSpeed's arguments (none), on the first call instead: the same compiled function for a
    run that uses Muon, nothing for the others. A DeepSpeed without that module, or a process that
    has imported it already, is left as it is.
    """
    import importlib
    import sys

    from deepspeed.runtime import compiler

    original = getattr(compiler, "compile", None)
    if MUON_MODULE in sys.modules or original is None:
        return
    compiler.compile = lambda: _compiled_on_first_call
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:  # another DeepSpeed: it imports what it has itself
        pass
    finally:
        compiler.compile = original


def _compiled_on_first_call(fn):
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


def fused_adam_is_built() -> bool:
    """Whether DeepSpeed's JIT-built fused Adam is already in torch's extension cache."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory("fused_adam", verbose=False)
    return any(name.endswith(".so") for name in os.listdir(folder)) if os.path.isdir(folder) else False


STALE_LOCK_S = 600  # older than any op build; a younger lock may be another machine's build in a shared folder


def clear_stale_build_locks() -> tuple[list[str], list[str]]:
    """Deals with torch's lock of each op build folder (torch.utils.file_baton) that no process on
    this machine holds; returns what this process removed and what it only names, in words (every
    rank calls it: one removes each lock). A process killed while it builds or loads
    a DeepSpeed op (SIGKILL: the OOM killer, `kill -9`) leaves its lock behind, and every later run
    waits for it without end, printing nothing. One older than any build is removed; a younger one
    is only named (a build on another machine may hold it, where the folder is shared)."""
    locks = _build_locks()
    if not locks:
        return [], []
    held = _open_files("[0-9]*")
    removed, named = [], []
    for lock in sorted(locks - held):
        with contextlib.suppress(FileNotFoundError):
            age = time.time() - os.stat(lock).st_mtime
            if age > STALE_LOCK_S:
                os.unlink(lock)
                removed.append(f"removed {lock}, {age / 60:.0f} min old and held by no process here: a run killed "
                               f"while it built or loaded {Path(lock).parent.name} left it, and DeepSpeed would wait "
                               f"for it without end")
            else:
                named.append(f"{lock} is held by no process on this machine: unless another machine builds into "
                             f"{Path(lock).parent} now, a killed run left it and DeepSpeed will wait for it without "
                             f"end: delete it")
    return removed, named


def release_build_locks() -> None:
    """Removes the op build locks this process holds, before it ends without unwinding (os._exit),
    which would leave them to stop every later run (see clear_stale_build_locks)."""
    for lock in _build_locks() & _open_files("self"):
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _build_locks() -> set[str]:
    """The real paths of the lock files in torch's extension build folders: TORCH_EXTENSIONS_DIR/NAME,
    or CACHE/torch_extensions/py311_cpu/NAME (torch.utils.cpp_extension._get_build_directory)."""
    from torch.utils.cpp_extension import get_default_build_root

    folders = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "*") if os.environ.get("TORCH_EXTENSIONS_DIR") else \
        os.path.join(get_default_build_root(), "*", "*")
    return set(map(os.path.realpath, glob.glob(os.path.join(folders, "lock"))))


def _open_files(pids: str) -> set[str]:
    """What the processes matching `pids` ("self", "[0-9]*": all that can be read) hold open."""
    files = set()
    for fd in glob.glob(f"/proc/{pids}/fd/*"):
        with contextlib.suppress(OSError):
            files.add(os.readlink(fd))
    return files
