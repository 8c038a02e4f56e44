"""Shared fixtures: real photos (scikit-image, scikit-learn) written as image folders in tmp_path,
and running the trainer under the real launcher."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the tools are scripts; tests import them as modules
# Launched jobs run CPU ranks on every machine (a one-GPU machine cannot host the tests' two GPU
# ranks); the `gpu`-marked tests ask for CUDA themselves.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two pytest-xdist workers on the cores, each launching jobs whose torch threads fill them all:
# OpenMP threads that spin while they wait for their team then burn the time slices the other
# jobs' threads need (measured on 2 cores: two 2-thread trainings at 39 steps/s each against 290
# alone; 180 each with passive waits; a CI run's tiny ViT fell to 0.5 img/s from 20). Every
# process the tests start inherits this; torch reads it when it loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import soak  # noqa: E402  (after the environment above: it loads torch)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs the CUDA path (DALI mixed decode, GPU operators); "
                                       "skipped where torch sees no GPU")
    if config.option.durations is None:  # a run's log (CI's) says where its time went
        config.option.durations = 15


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@cache
def photos() -> list[np.ndarray]:
    """Real RGB photos of several sizes and aspect ratios."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    images += list(load_sample_images().images)
    return images


def photo(n: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """The n-th distinct real image: a crop of a photo, resized to `size` (width, height)."""
    source = photos()[n % len(photos())]
    h, w = source.shape[:2]
    k = n // len(photos())
    top, left = (k * 37) % (h // 3), (k * 53) % (w // 3)
    crop = Image.fromarray(source[top : top + 2 * h // 3, left : left + 2 * w // 3])
    return crop.resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def exif_rotated_jpeg(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(img, "JPEG", quality=90, exif=exif)


def cmyk_jpeg(img: Image.Image) -> bytes:
    return encode(img.convert("CMYK"), "JPEG", quality=90)


def png16(img: Image.Image) -> bytes:
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def rgba_png(img: Image.Image) -> bytes:
    rgba = img.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


# Every kind of valid input, and the conversion reason the tool must record (None: copied).
VALID_KINDS = {
    "baseline.jpg": (lambda im: encode(im, "JPEG", quality=90), None),
    "gray.jpeg": (lambda im: encode(im.convert("L"), "JPEG", quality=90), None),
    "progressive.jpg": (lambda im: encode(im, "JPEG", quality=90, progressive=True), "jpeg_progressive"),
    "cmyk.jpg": (cmyk_jpeg, "jpeg_cmyk"),
    "rotated.jpg": (exif_rotated_jpeg, "exif_rotated"),
    "photo.png": (lambda im: encode(im, "PNG"), "format_png"),
    "alpha.png": (rgba_png, "format_png"),
    "deep.png": (png16, "format_png"),
    "photo.webp": (lambda im: encode(im, "WEBP", quality=90), "format_webp"),
    "photo.bmp": (lambda im: encode(im, "BMP"), "format_bmp"),
    "photo.tif": (lambda im: encode(im, "TIFF"), "format_tiff"),
    "palette.gif": (lambda im: encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), "format_gif"),
}
LONG_NAME = "nested.dir/deeper/" + "a very long file name with spaces, dots.and-dashes " * 3 + ".v2.JPG"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_class(folder: Path, first: int, kinds=VALID_KINDS) -> int:
    """One file of every kind, each a different real image; returns how many."""
    for i, (name, (make, _)) in enumerate(kinds.items()):
        size = (96 + 8 * (i % 3), 72 + 10 * (i % 4))
        write(folder / name, make(photo(first + i, size)))
    return len(kinds)


def write_bad_files(folder: Path) -> dict[str, int]:
    """One input of each skip reason (with --min-side 8); returns the expected counts."""
    good = encode(photo(0), "JPEG", quality=90)
    write(folder / "empty.jpg", b"")
    write(folder / "truncated.jpg", good[: len(good) // 2])
    write(folder / "random.png", np.random.default_rng(0).bytes(5000))
    write(folder / "IMG_0001.HEIC", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + bytes(64))  # Pillow has no HEIC
    write(folder / "tiny.png", encode(photo(1, (6, 5)), "PNG"))
    write(folder / "notes.txt", b"not an image: ignored, not counted")
    write(folder / ".DS_Store", b"hidden files are ignored")
    return {"empty": 1, "truncated": 1, "undecodable": 1, "unsupported_format": 1, "too_small": 1}


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """SRC/<class>/... with three classes (one with a dot in its name), all inputs valid, and two
    files that are no images; `cat` also holds a long nested name full of dots and spaces."""
    src = tmp_path / "src"
    for c, name in enumerate(["zebra", "cat", "dog.big"]):
        write_class(src / name, first=c * 20)
    write(src / "cat" / LONG_NAME, encode(photo(99), "JPEG", quality=90))
    write(src / "dog.big" / "LICENSE.txt", b"CC-BY")
    write(src / "README.md", b"top-level file")
    return src


@pytest.fixture
def digits_folder(tmp_path: Path) -> Path:
    """scikit-learn's handwritten digits as a class folder tree (1797 real 8x8 images)."""
    from make_shards import export_digits

    return export_digits(tmp_path / "digits")


def read_with_dali(split_dir: Path, *, batch_size: int = 8) -> list[tuple[str, int, tuple]]:
    """(key, label, decoded HWC shape) of every sample, read by DALI's webdataset reader with
    the written index files and decoded on CPU."""
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(split_dir.glob("*.tar"))
    count = sum(int(p.with_suffix(".idx").read_text().split()[1]) for p in tars)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(p) for p in tars], index_paths=[str(p.with_suffix(".idx")) for p in tars],
            ext=["jpg", "cls"], missing_component_behavior="error", name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    seen = []
    while len(seen) < count:
        images, labels = p.run()
        for i in range(len(images)):
            if len(seen) == count:
                break
            key = images[i].source_info().rsplit(":", 1)[-1].split(".", 1)[0]  # path.tar:offset:key.ext
            seen.append((key, int(bytes(np.array(labels[i])).decode("ascii")), images.at(i).shape))
    return seen


# --- the trainer under the real launcher (tests/test_train.py, tests/test_resume.py) ---------------

TINY_RESNET, TINY_VIT = soak.MODELS["resnet"], soak.MODELS["vit"]  # the tiny models tools/soak.py trains


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root on Linux), or None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def free_port() -> int:
    """A free port for a job's rendezvous: below Linux's ephemeral range (32768-60999), where no
    socket the kernel numbers itself can take it before the job binds it, and in a block of its own
    for each pytest-xdist worker, so that jobs of two workers never pick the same one."""
    start = 20000 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]) % 4 * 2000  # below gpu_report's 29600
    for port in random.sample(range(start, start + 2000), 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or closing
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + 1999}")


def launcher(*, ranks: int | None = 2, extra: list[str] = (), via: str = "launch") -> list[str]:
    """How a test starts the trainer's ranks. `launch` (the default): DeepSpeed's node launcher,
    the process the `deepspeed` command starts on each node to start that node's ranks (their
    environment, the signals they get, the job's exit status all come from it). `deepspeed`: that
    command, one more Python process importing DeepSpeed before it (3.3 s of CPU of a 2-rank
    launch's 26, measured), for the tests about it (a rank watches it: train/distributed.py
    deepspeed_runner). `torchrun`; and ranks=None: plain python, a world of one."""
    script = str(ROOT / "train" / "main.py")
    if via == "deepspeed":  # ranks=None: one per device it finds, as the README's command (1 on a CPU)
        return ["deepspeed", *(["--num_gpus", str(ranks)] if ranks else []), "--master_port", str(free_port()),
                *extra, script]
    if ranks is None:
        return [sys.executable, script]
    if via == "torchrun":
        return ["torchrun", "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *extra, script]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", "--master_port", str(free_port()), *extra, script]


def two_nodes(args: list[str], *, tmp_path: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """The trainer as two nodes of one rank each on this machine (a two-line hostfile, one
    `deepspeed --no_ssh --node_rank K` per node), sharing the working tree and output dir."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, env = str(free_port()), {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                              "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "train" / "main.py"),
                              *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                             start_new_session=True)
            for k in (0, 1)]


def train(args: list[str], *, ranks: int | None = 2, env: dict | None = None, check: bool = True,
          cwd: Path | None = None, via: str = "launch") -> subprocess.CompletedProcess:
    # W&B only where a test asks for it (env={"WANDB_MODE": "offline"}): the tests that check what
    # it logs, and those whose ranks must end with its service running; it costs a launch ~3.5 s
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    job = subprocess.Popen(launcher(ranks=ranks, via=via) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=cwd or ROOT, start_new_session=True)
    out, err = finish(job, timeout=600)
    done = subprocess.CompletedProcess(job.args, job.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def finish(job: subprocess.Popen, *, timeout: float) -> tuple[str, str | None]:
    """A job's (stdout, stderr) once it exits (the job started in a session of its own). One still
    running after `timeout` s is hung: each of its ranks prints every thread's Python stack
    (SIGUSR1, see train/main.py), the job is killed, and the failure shows where each rank waited."""
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_ranks(job, signal.SIGUSR1)
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        raise AssertionError(f"hung: still running after {timeout:.0f}s, killed; its output ends (every rank's "
                             f"stacks last):\n{out[-20000:]}\n{(err or '')[-20000:]}") from None


def rank_processes(job: subprocess.Popen) -> list:
    """The trainer's ranks among the job's processes (psutil's), not the launcher."""
    import psutil

    ranks = []
    for proc in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            command = [part for part in proc.cmdline()[1:] if part != "-u"]
            if command and command[0].endswith("main.py"):  # a rank; the launcher runs deepspeed's modules
                ranks.append(proc)
    return ranks


def signal_ranks(job: subprocess.Popen, signum: int) -> int:
    """Sends `signum` to the trainer's ranks (not to the launcher), half a second apart (what they
    print on it then does not interleave in the job's output); how many."""
    import psutil

    sent = 0
    for proc in rank_processes(job):
        with contextlib.suppress(psutil.Error):
            time.sleep(0.5 if sent else 0)
            proc.send_signal(signum)
            sent += 1
    return sent


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def evals(output_dir: Path) -> list[dict]:
    return [m for m in metrics(output_dir) if "eval/top1" in m]


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Digits shards (1618 train / 179 val), photo shards (36 train / 12 val, 4 classes), model
    configs and a 32x32 image processor."""
    from make_shards import make_shards
    from transformers import ViTImageProcessorPil

    root = tmp_path_factory.mktemp("train")
    make_shards(src="sklearn:digits", out=root / "digits", max_count=100, progress=False)
    for n in range(48):
        folder = root / "photos" / f"class{n % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(n, (48, 40)).save(folder / f"{n}.jpg", quality=90)
    make_shards(src=root / "photos", out=root / "photo_shards", val_fraction=0.25, max_count=6, progress=False)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(root / "processor")
    for name, config in (("resnet", TINY_RESNET), ("vit", TINY_VIT)):
        (root / f"{name}.json").write_text(json.dumps(config))
    return {"root": root, "digits": root / "digits", "photos": root / "photo_shards", "processor": root / "processor",
            "resnet": root / "resnet.json", "vit": root / "vit.json"}


def common(files, data: str, model: str, out: Path) -> list[str]:
    return ["--data", str(files[data]), "--model_config", str(files[model]), "--processor", str(files["processor"]),
            "--output_dir", str(out), "--precision", "fp32", "--hflip", "0", "--crop_scale", "0.6", "1"]
