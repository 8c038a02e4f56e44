"""Convert a raw image folder into WebDataset shards that DALI and `webdataset` both read.

    python tools/make_shards.py SRC OUT [--val-fraction 0.1] [--workers N] ...

SRC is either `SRC/<class>/**/<image>` (split into train/val here, stratified per class over the
valid images) or split folders `SRC/train/<class>/...` + `SRC/val/<class>/...` (also `validation`,
`valid`, `dev`; and `test`), kept as given; `sklearn:digits` shards
scikit-learn's bundled handwritten digits (real images, 10 classes, no download). SRC can also be a
Hugging Face dataset: a `save_to_disk` folder, Parquet files (a folder or a glob) or `hf:NAME[:CONFIG]`,
streamed row by row, its splits and ClassLabel names kept (pipelines/hf_source.py).

Every `.jpg` written is a baseline 8-bit RGB or grayscale JPEG: clean JPEGs are copied byte
for byte, everything else is decoded and re-encoded once. Transparent images are composited
over white. Bad inputs are skipped, counted and listed in `OUT/manifest.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pipelines.hf_source import HFSource, HFSourceError, is_hf_source, open_source
from pipelines.shards import (
    CLASSES_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SPLIT_ALIASES,
    SPLITS,
    ShardWriter,
    class_name,
    decode_fully,
    jpeg_problems,
    sample_key,
    write_atomic,
)

# Extensions of the formats Pillow decodes (not its stubs for HDF5, GRIB, WMF..., nor MPEG video, which
# it only identifies)
IMAGE_EXTENSIONS = frozenset(
    ext for ext, fmt in Image.registered_extensions().items()
    if fmt in Image.OPEN and fmt != "MPEG"
    and not (isinstance(Image.OPEN[fmt][0], type) and issubclass(Image.OPEN[fmt][0], ImageFile.StubImageFile)))
# Image formats known by their first bytes, whatever the file's name (ISO media files by their brand)
IMAGE_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
                    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\xff\x0a": "JPEG XL", b"\x00\x00\x00\x0cJXL ": "JPEG XL",
                    b"\x00\x00\x00\x0cjP  ": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000"}
IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
# Folders that tools, archives and storage systems put beside the data: never a class, never inputs
# (a Synology NAS's @eaDir holds JPEG thumbnails of every image, which would be trained as copies)
SYSTEM_FOLDERS = {"__macosx": "macOS archive metadata", "@eadir": "Synology thumbnails",
                  "#recycle": "Synology recycle bin", "#snapshot": "Synology snapshots",
                  "$recycle.bin": "Windows recycle bin", "system volume information": "Windows volume data",
                  "lost+found": "fsck's recovered files"}
LISTED = 1000  # the manifest names this many of the ignored files and of each kind of duplicate (all counted)
BACKGROUND = (255, 255, 255)  # transparent pixels become white
BUILTIN_SOURCES = ("sklearn:digits",)
CHUNK, CHUNK_BYTES = 4096, 64 << 20  # inputs in flight to the workers at a time, and their bytes at most


class ShardingError(Exception):
    """A problem with the user's input or options; main() prints it as one line."""


@dataclass(frozen=True)
class EncodeOptions:
    quality: int
    max_side: int | None
    min_side: int


@dataclass(frozen=True)
class Source:
    relpath: str  # POSIX, relative to SRC
    label: int


# --- one image ----------------------------------------------------------------------------

class NotAFile(OSError):
    """A named pipe or a device under an input's name: reading it would block, or never end."""


def open_file(path: str | Path):
    """`path` opened for reading, a regular file (links followed); else NotAFile, at once (the
    open does not wait for a named pipe's writer)."""
    f = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")  # no effect on a regular file's reads
    if not stat.S_ISREG(mode := os.fstat(f.fileno()).st_mode):
        f.close()
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "no regular file"
        raise NotAFile(f"{path} is {kind}, not a file")
    return f


def convert_image(image: str | bytes | None, opts: EncodeOptions) -> tuple[str, bytes | str | None, list[str], int]:
    """("ok", new jpeg bytes, conversion reasons, digest), ("ok", None, [], digest) for an input to
    copy as it is (cheaper than sending its bytes between processes), or ("skip", reason, [detail], 0).
    `image` is a file's path or its bytes (a dataset row's); the digest is a hash of those bytes,
    which tells byte-identical inputs apart from the others."""
    data = image
    if isinstance(image, str):
        try:
            with open_file(image) as f:
                data = f.read()
        except NotAFile as e:
            return "skip", "not_a_file", [str(e)], 0
        except OSError as e:
            return "skip", "unreadable", [str(e)], 0
    if not data:
        return "skip", "empty", ["zero bytes"], 0
    status, payload, info = _convert(data, opts)
    digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") if status == "ok" else 0
    return status, payload, info, digest


def _convert(data: bytes, opts: EncodeOptions) -> tuple[str, bytes | str | None, list[str]]:
    try:
        # the JPEG hint skips Pillow's format probing, a tenth of the validation cost
        img = Image.open(io.BytesIO(data), formats=["JPEG"] if data[:2] == b"\xff\xd8" else None)
        reasons = jpeg_problems(img, data)
        if opts.max_side and max(img.size) > opts.max_side:
            reasons.append("downsized")
        size = img.size  # before decoding: a JPEG decodes at 1/8 scale below
        decode_fully(img) if not reasons else img.load()
    except Image.DecompressionBombError as e:
        return "skip", "too_large", [str(e)]
    except UnidentifiedImageError:
        if fmt := image_format(data[:16]):
            return "skip", "unsupported_format", [f"a {fmt} image, which Pillow cannot decode here: convert it "
                                                  f"to JPEG or PNG"]
        return "skip", "undecodable", ["not an image Pillow recognises"]
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = "truncated" if "truncated" in str(e) else "undecodable"
        return "skip", reason, [f"{type(e).__name__}: {e}"]
    if not reasons:
        if min(size) < opts.min_side:
            return "skip", "too_small", [f"{size[0]}x{size[1]} < --min-side {opts.min_side}"]
        return "ok", None, []

    mode = img.mode
    img = to_rgb_or_gray(ImageOps.exif_transpose(img))
    if img is None:
        return "skip", "unsupported_mode", [f"pixel mode {mode}"]
    if opts.max_side and max(img.size) > opts.max_side:
        scale = opts.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    if min(img.size) < opts.min_side:
        return "skip", "too_small", [f"{img.width}x{img.height} < --min-side {opts.min_side}"]
    out = io.BytesIO()
    img.save(out, "JPEG", quality=opts.quality)  # baseline, no EXIF/ICC carried over
    return "ok", out.getvalue(), reasons


def to_rgb_or_gray(img: Image.Image) -> Image.Image | None:
    """8-bit RGB or L; alpha composited over BACKGROUND; None for float pixels."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I"):  # 16/32-bit integer grayscale, e.g. 16-bit PNG and TIFF
        pixels = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if mode == "F":
        return None
    if "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        flat = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
        return flat.convert("L") if mode in ("LA", "La") else flat
    return img.convert("RGB")  # CMYK, P, YCbCr, LAB, HSV


# --- the source tree ----------------------------------------------------------------------

# Top-level folder names taken as splits: pipelines/shards.py SPLIT_ALIASES
# Names that look like a split but are none of those: refused rather than trained as a class
SPLIT_LIKE = re.compile(r"^(train|training|val|valid|validation|dev|test|testing|eval|evaluation|holdout|trainval)"
                        r"([-_.]?[a-z0-9]*)$", re.IGNORECASE)


def left_out(name: str) -> str | None:
    """Why a folder or file of this name is no data: hidden, or a SYSTEM_FOLDERS name; else None."""
    return "hidden" if name.startswith(".") else SYSTEM_FOLDERS.get(name.lower())


def split_folders(src: Path) -> dict[str, Path] | None:
    """{split: folder} when SRC's top level is split folders, None when it is class folders."""
    dirs = sorted(p for p in src.iterdir() if p.is_dir() and not left_out(p.name))
    if not any(SPLIT_LIKE.match(d.name) for d in dirs):
        return None
    splits: dict[str, Path] = {}
    for d in dirs:
        split = SPLIT_ALIASES.get(d.name.lower())
        if split in splits:
            raise ShardingError(f"{src}: {splits[split].name}/ and {d.name}/ are both the {split} split; keep one")
        if split:
            splits[split] = d
    if unknown := [d.name for d in dirs if d.name.lower() not in SPLIT_ALIASES]:
        raise ShardingError(
            f"{src} has split folders ({', '.join(p.name for p in splits.values()) or 'none known'}) and "
            f"{', '.join(unknown)}, which is no split this tool knows; name the splits train, val "
            f"(or validation, valid, dev) and test, or shard a folder of class folders")
    if "train" not in splits:
        raise ShardingError(f"{src} has split folders ({', '.join(p.name for p in splits.values())}) but no train/")
    return splits


def image_format(head: bytes) -> str | None:
    """The image format that a file's first 16 bytes announce, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return IMAGE_BRANDS.get(head[8:12])
    return next((name for sig, name in IMAGE_SIGNATURES.items() if head.startswith(sig)), None)


def is_image(path: Path) -> bool:
    """Whether a file is an image to shard (or to count as bad): an extension Pillow opens, or else
    the first bytes of an image format (a JPEG saved without extension, a HEIC photo Pillow cannot
    decode). Anything else (captions, labels, licences, Thumbs.db) is no input at all."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open_file(path) as f:
            return image_format(f.read(16)) is not None
    except OSError:
        return True  # unreadable, or no file: checked, and named, as an input


def find_sources(src: Path, *, classes_file: Path | None):
    """Class names, {split or None (to be split here): {class: [relpath]}}, the inputs already
    skipped (images outside any class folder), the files that are no images, the system folders
    left out (their paths), and the layout name."""
    roots = split_folders(src)
    layout = "train_val" if roots else "class_folders"
    roots = roots or {None: src}
    files: dict[str | None, dict[str, list[str]]] = {}
    skipped, ignored, system = [], [], []

    def data(folder: Path, name: str) -> bool:
        """Whether `name` in `folder` may hold data; a system folder is recorded, hidden ones not."""
        why = left_out(name)
        if why and why != "hidden" and (folder / name).is_dir():
            system.append((folder / name).relative_to(src).as_posix())
        return why is None

    def outside_class(entry: Path):
        rel = entry.relative_to(src).as_posix()
        if is_image(entry):
            skipped.append({"path": rel, "reason": "outside_class", "detail": "not inside a class folder"})
        else:
            ignored.append(rel)

    for entry in sorted(src.iterdir()) if layout == "train_val" else ():
        if data(src, entry.name) and not entry.is_dir():
            outside_class(entry)
    folders: dict[tuple[str | None, str], Path] = {}  # (split, class) -> its folder
    for split, root in roots.items():
        files[split] = {}
        for entry in sorted(root.iterdir()):
            if not data(root, entry.name):
                continue
            if not entry.is_dir():
                outside_class(entry)
                continue
            label = class_name(entry.name)
            if (split, label) in folders:
                raise ShardingError(f"{folders[split, label]} and {entry} are the class {label!r} in two Unicode forms "
                                    f"(composed and decomposed, as a Mac writes names); move one's images into the "
                                    f"other")
            folders[split, label] = entry
            names = files[split].setdefault(label, [])
            # links are followed, but a folder is walked once, and never one holding the class folder: a
            # link back up the tree would be walked to the kernel's link limit, or reach other classes
            top, walked = entry.resolve(), set()
            for dirpath, dirnames, filenames in os.walk(entry, followlinks=True):
                real = Path(dirpath).resolve()
                if real in walked or (real != top and top.is_relative_to(real)):
                    dirnames.clear()
                    continue
                walked.add(real)
                dirnames[:] = sorted(d for d in dirnames if data(Path(dirpath), d))
                prefix = Path(dirpath).relative_to(src).as_posix()
                for name in sorted(filenames):
                    if not name.startswith("."):
                        (names if is_image(Path(dirpath, name)) else ignored).append(f"{prefix}/{name}")

    found = sorted(set().union(*(f.keys() for f in files.values())))
    if not found:
        if (src / MANIFEST_FILE).is_file():
            raise ShardingError(f"{src} holds shards written by this tool ({MANIFEST_FILE}), not images: train on it "
                                f"with --data {src}")
        raise ShardingError(f"{src} has no class folders (expected SRC/<class>/<image> or SRC/train/<class>/...)")
    if classes_file:
        classes = load_class_list(classes_file)
        if unknown := [c for c in found if c not in classes]:
            raise ShardingError(f"class folders {unknown[:5]} are not in --classes {classes_file}")
    else:
        classes = found
    for split, per_class in files.items():
        for name, paths in per_class.items():
            if not paths:
                raise ShardingError(f"class folder {folders[split, name]} has no image files")
    if layout == "train_val":
        for split in ("val", "test"):
            if missing := sorted(files.get(split, {}).keys() - files["train"].keys()):
                raise ShardingError(f"classes {missing[:5]} have a {roots[split].name} folder but no train folder in {src}")
    train = "train" if layout == "train_val" else None
    if len(files[train]) < 2:
        raise ShardingError(one_class(folders[train, next(iter(files[train]))], layout=layout))
    return classes, files, skipped, ignored, system, layout


def one_class(folder: Path, *, layout: str) -> str:
    """The error for a source whose train images are all in one class folder, and where the classes
    seem to be: an archive unpacked into a folder of its own (SRC/flowers/<class>/...) gives one."""
    error = f"{folder.parent} has one class folder, {folder.name}/: a classifier needs two classes or more"
    inner = sorted(d.name for d in folder.iterdir() if d.is_dir() and not left_out(d.name))
    if len(inner) < 2:
        return error
    named = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
    try:
        splits = split_folders(folder)
    except ShardingError:
        splits = None
    if splits:
        return f"{error}; {folder} holds the split folders ({named}): pass it as SRC"
    if layout == "class_folders":
        return f"{error}; its {len(inner)} folders ({named}) look like the classes: pass {folder} as SRC"
    return f"{error}; its {len(inner)} folders ({named}) look like the classes: move them up into {folder.parent}"


def split_valid(files: dict[str | None, dict[str, list[str]]], digests: dict[str, int], *, label: dict[str, int],
                val_fraction: float, rng: random.Random) -> tuple[dict[str, list[Source]], dict]:
    """The valid inputs (those with a digest) per split, each split shuffled (seeded) so that no
    shard is one class, and what was found byte-identical (`duplicates` of the manifest).

    Folders without splits are split here, per class over the images that turned out valid:
    `round(n_valid * val_fraction)` go to val (at least one stays in train), where byte-identical
    copies count as one image and go to the same split, and an image filed under two classes goes to
    train: val never holds a copy of a train image, nor an image whose label is in doubt. Splits
    given by the source are kept; copies across them are reported."""
    classes_of: dict[int, set[str]] = {}
    for per_class in files.values():
        for name, paths in per_class.items():
            for p in paths:
                if p in digests:
                    classes_of.setdefault(digests[p], set()).add(name)
    splits: dict[str, list[Source]] = {s: [] for s in SPLITS}
    for split, per_class in files.items():
        for name, paths in per_class.items():
            paths = sorted(p for p in paths if p in digests)
            if split is not None:
                splits[split] += [Source(p, label[name]) for p in paths]
                continue
            groups: dict[int, list[str]] = {}
            for p in paths:
                groups.setdefault(digests[p], []).append(p)
            ambiguous = [p for d, group in groups.items() if len(classes_of[d]) > 1 for p in group]
            groups = [group for d, group in groups.items() if len(classes_of[d]) == 1]
            rng.shuffle(groups)
            n_val = max(0, min(math.floor(len(groups) * val_fraction + 0.5), len(groups) - 1))
            splits["val"] += [Source(p, label[name]) for group in groups[:n_val] for p in group]
            kept = [p for group in groups[n_val:] for p in group] + ambiguous
            splits["train"] += [Source(p, label[name]) for p in kept]
    for sources in splits.values():
        sources.sort(key=lambda s: s.relpath)
        rng.shuffle(sources)
    return splits, duplicates_found(splits, digests, classes_of, split_here=None in files)


def duplicates_found(splits: dict[str, list[Source]], digests: dict[str, int], classes_of: dict[int, set[str]], *,
                     split_here: bool) -> dict:
    """Byte-identical inputs: how many are copies of another, the groups filed under more than one
    class, and each val or test input that is a copy of a train input (with that train input)."""
    groups: dict[int, list[str]] = {}
    for sources in splits.values():
        for source in sources:
            groups.setdefault(digests[source.relpath], []).append(source.relpath)
    train: dict[int, str] = {}  # digest -> the first train input with it
    for source in sorted(splits["train"], key=lambda s: s.relpath):
        train.setdefault(digests[source.relpath], source.relpath)
    classes = sorted(sorted(group) for d, group in groups.items() if len(classes_of[d]) > 1)
    leaks = sorted(({"path": s.relpath, "split": split, "train": train[digests[s.relpath]]}
                    for split in SPLITS if split != "train" for s in splits[split] if digests[s.relpath] in train),
                   key=lambda d: d["path"])
    return {"copies": sum(len(group) - 1 for group in groups.values()), "split_here": split_here,
            "across_classes": {"count": len(classes), "groups": classes[:LISTED]},
            "across_splits": {"count": len(leaks), "inputs": leaks[:LISTED]}}


def load_class_list(path: Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line (NFC: `class_name`)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ShardingError(f"--classes {path}: {e.strerror}") from None
    names = json.loads(text) if text.lstrip().startswith("[") else [l.strip() for l in text.splitlines() if l.strip()]
    names = [class_name(n) if isinstance(n, str) else n for n in names]
    if len(set(names)) != len(names):
        raise ShardingError(f"--classes {path} lists a class twice")
    return names


def export_digits(dest: Path) -> Path:
    """scikit-learn's bundled handwritten digits as an image folder: dest/<digit>/<n>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        folder = dest / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        grey = np.rint(pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(grey, "L").save(folder / f"{n:04d}.png")
    return dest


# --- the whole run ------------------------------------------------------------------------

def check_inputs(inputs: Iterable[tuple[str, str | bytes | None]], *, total: int | None, stage, keep_all: bool,
                 workers: int | None, progress: bool, opts: EncodeOptions) -> tuple[dict, dict, list[dict], list[dict]]:
    """Decodes (and where needed converts) every input, a (relpath, path or bytes) pair, in order
    whatever the number of workers: ({relpath: (offset, size) of its JPEG in `stage`, or None to
    copy the file as it is}, {relpath: digest of its bytes} (convert_image), the converted inputs
    with their reasons, the skipped ones with theirs).
    With `keep_all` every valid input is staged (dataset rows cannot be read again).
    Inputs go to the workers a chunk at a time, so memory stays bounded on a stream of rows."""
    staged, digests, converted, skipped = {}, {}, [], []
    with Pool(workers or os.cpu_count(), initializer=_worker_signals) as pool, tqdm(
            total=total, unit="img", disable=not progress, desc="checking") as bar:
        for chunk in _chunks(inputs):
            results = pool.imap(partial(convert_image, opts=opts), [image for _, image in chunk], chunksize=16)
            for (relpath, image), (status, payload, info, digest) in zip(chunk, results):
                bar.update(1)
                if status == "skip":
                    skipped.append({"path": relpath, "reason": payload, "detail": info[0]})
                    continue
                digests[relpath] = digest
                if payload is None and keep_all:
                    payload = image if isinstance(image, bytes) else Path(image).read_bytes()
                staged[relpath] = None if payload is None else (stage.tell(), len(payload))
                if payload is not None:
                    stage.write(payload)
                if info:  # conversion reasons
                    converted.append({"path": relpath, "reasons": info})
    return staged, digests, converted, skipped


def _worker_signals() -> None:
    """A worker leaves Ctrl-C to the parent (which ends the pool: one message, not a traceback per
    worker) and dies of the pool's SIGTERM as processes do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _chunks(inputs: Iterable[tuple[str, str | bytes | None]]):
    """Lists of at most CHUNK inputs and CHUNK_BYTES of image bytes (a path counts nothing)."""
    chunk, size = [], 0
    for item in inputs:
        chunk.append(item)
        size += len(item[1]) if isinstance(item[1], bytes) else 0
        if len(chunk) == CHUNK or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def write_splits(splits: dict[str, list[Source]], *, out: Path, folder: Path, staged: dict, stage, max_count: int,
                 max_size: int, progress: bool) -> tuple[dict[str, ShardWriter], dict[str, Counter]]:
    """Writes each split's samples, in order, into its shards: (the writers, per-class counts)."""
    writers = {split: ShardWriter(out / split, max_count, max_size) for split in SPLITS}
    per_class = {split: Counter() for split in SPLITS}
    jobs = [(split, source) for split in SPLITS for source in splits[split]]
    for split, source in tqdm(jobs, unit="img", disable=not progress, desc="writing"):
        if (where := staged[source.relpath]) is None:
            with open(os.path.join(folder, source.relpath), "rb") as f:
                jpeg = f.read()
        else:
            stage.seek(where[0])
            jpeg = stage.read(where[1])
        writers[split].write(sample_key(source.relpath), source.label, jpeg)
        per_class[split][source.label] += 1
    for writer in writers.values():
        writer.close()
    return writers, per_class


def prepare_output(out: Path, *, overwrite: bool) -> None:
    ours = [out / s for s in SPLITS] + [out / MANIFEST_FILE, out / CLASSES_FILE]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ShardingError(f"{out} {_holds(out)}; pass --overwrite to replace the shards in it")
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def shards_in(out: Path) -> str | None:
    """What of this tool's output `out` holds: "complete" (a manifest), "partial" (splits or classes
    without one: an interrupted run's), or None."""
    if (out / MANIFEST_FILE).is_file():
        return "complete"
    if any((out / name).exists() for name in (*SPLITS, CLASSES_FILE)):
        return "partial"
    return None


def _holds(out: Path) -> str:
    """What the non-empty output folder `out` holds, for a message."""
    return {"complete": f"holds shards ({MANIFEST_FILE})",
            "partial": f"holds shards without a {MANIFEST_FILE}, which no loader takes (an interrupted run's)",
            None: "is not empty"}[shards_in(out)]


def interrupted(out: Path, how: str) -> str:
    """The message for a run stopped by `how` (Ctrl-C, SIGTERM): what it left in `out` (complete
    shards: it stopped before touching an earlier run's, or once done)."""
    left = {"complete": f"{out} holds complete shards ({MANIFEST_FILE})",
            "partial": f"the shards written so far in {out} are incomplete (no {MANIFEST_FILE}, so no loader takes "
                       f"them); rerun with --overwrite",
            None: "nothing was written"}[shards_in(out)]
    return f"stopped by {how}: {left}"


class _Terminated(Exception):
    """SIGTERM (a scheduler's time limit, `kill`): raised in the main thread so that cleanup runs."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


class FolderInputs:
    """An image folder's inputs: known, with their classes and splits, before any is read."""

    keep_all = False  # files can be read again: only converted ones are staged

    def __init__(self, folder: Path, *, classes_file: Path | None, description: str):
        self.folder, self.description, self.details = folder, description, {}
        self.classes, self.files, self.skipped, self.ignored, self.system, self.layout = find_sources(
            folder, classes_file=classes_file)
        self.paths = sorted(p for per_class in self.files.values() for ps in per_class.values() for p in ps)
        self.total = len(self.paths)

    def items(self):
        return ((p, os.path.join(self.folder, p)) for p in self.paths)

    def finish(self) -> list[str]:
        return self.classes


class DatasetInputs:
    """A Hugging Face dataset's rows, streamed: splits and labels are learnt while reading."""

    keep_all, layout, folder = True, "hf_dataset", None

    def __init__(self, source: HFSource, *, classes_file: Path | None):
        self.source, self.description, self.details = source, source.description, {"hf": source.manifest()}
        self.classes = load_class_list(classes_file) if classes_file else source.classes
        self.classes_file = classes_file
        self.files: dict[str | None, dict[str, list[str]]] = {split: {} for split in source.splits}
        self.skipped: list[dict] = []
        self.ignored: list[str] = []
        self.system: list[str] = []
        self.total = source.total

    def items(self):
        try:
            yield from self._items()
        except HFSourceError as e:
            raise ShardingError(f"{e}; no manifest was written") from None

    def _items(self):
        for split, name, image, label in self.source.rows():
            if label is None:
                self.skipped.append({"path": name, "reason": "unlabeled", "detail": f"no {self.source.label_column}"})
                continue
            self.files[split].setdefault(label, []).append(name)
            yield name, image

    def finish(self) -> list[str]:
        """The class names, once every row was read: the ClassLabel's or --classes (in their order),
        else the labels found (integers in numeric order)."""
        found = set().union(*(per_class.keys() for per_class in self.files.values()))
        if self.classes is None:
            return sorted(found, key=lambda n: (0, int(n), "") if re.fullmatch(r"-?\d+", n) else (1, 0, n))
        if unknown := sorted(found - set(self.classes)):
            raise ShardingError(f"labels {unknown[:5]} of {self.description} are not in --classes {self.classes_file}")
        return self.classes


def open_inputs(src: str | Path, out: Path, *, stack: contextlib.ExitStack, classes_file: Path | None,
                image_column: str | None, label_column: str | None, splits: dict[str, str] | None):
    """The inputs of `src`: the built-in digits, a Hugging Face dataset or an image folder."""
    if str(src) in BUILTIN_SOURCES:
        folder = export_digits(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        return FolderInputs(folder, classes_file=classes_file, description=str(src))
    if is_hf_source(str(src)):
        if not str(src).startswith("hf:") and out.is_relative_to(Path(str(src).split("*")[0]).resolve()):
            raise ShardingError(f"OUT {out} must not be inside SRC {src}")
        where = str(src) if str(src).startswith("hf:") else os.path.abspath(str(src))
        try:
            return DatasetInputs(open_source(where, image_column=image_column, label_column=label_column,
                                             splits=splits), classes_file=classes_file)
        except HFSourceError as e:
            raise ShardingError(str(e)) from None
    if image_column or label_column or splits:
        raise ShardingError(f"--image-column, --label-column and --splits apply to Hugging Face datasets; {src} is "
                            f"an image folder")
    folder = Path(src).resolve()
    if not folder.is_dir():
        raise ShardingError(f"source folder {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    if out == folder or folder in out.parents:
        raise ShardingError(f"OUT {out} must not be inside SRC {folder}")
    return FolderInputs(folder, classes_file=classes_file, description=str(folder))


def check_options(options: dict) -> None:
    if not 0 <= options["val_fraction"] < 1:
        raise ShardingError(f"--val-fraction must be in [0, 1), got {options['val_fraction']}")
    if options["max_count"] < 1 or options["max_size"] < 1024:
        raise ShardingError("--max-count must be >= 1 and --max-size >= 1 KiB")
    if not 1 <= options["quality"] <= 100:
        raise ShardingError(f"--quality must be in 1..100, got {options['quality']}")


def unusable(files: dict, classes: list[str], per_class: dict, *, skipped: int, inputs: int, max_bad_fraction: float,
             manifest: Path) -> list[str]:
    """Why loaders refuse these shards (the manifest's "errors"): too many inputs skipped, or a class
    with inputs but no valid train image."""
    errors = []
    if inputs and skipped / inputs > max_bad_fraction:
        errors.append(f"{skipped} of {inputs} inputs skipped ({skipped / inputs:.1%} > --max-bad-fraction "
                      f"{max_bad_fraction:.1%}); the list is under 'skipped' in {manifest}")
    present = set(c for in_split in files.values() for c in in_split)
    errors += [f"class {name!r} has no valid train image (see 'skipped' in {manifest})"
               for name in classes if name in present and not per_class["train"][classes.index(name)]]
    trained = [name for i, name in enumerate(classes) if per_class["train"][i]]
    if len(trained) < 2:
        errors.append((f"one class alone, {trained[0]!r}," if trained else "no class") + " has valid train images: a "
                      "classifier needs two classes or more")
    return errors


def make_shards(
    *,
    src: str | Path,
    out: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    classes_file: Path | None = None,
    quality: int = 95,
    max_side: int | None = None,
    min_side: int = 1,
    max_count: int = 10_000,
    max_size: int = 1_000_000_000,
    max_bad_fraction: float = 0.01,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    splits: dict[str, str] | None = None,
) -> dict:
    """Write shards, classes.json and manifest.json under `out`; returns the manifest.

    `src` is an image folder, a Hugging Face dataset (pipelines/hf_source.py: `image_column`,
    `label_column` and `splits` choose its columns and splits) or a built-in source. Raises
    ShardingError for unusable input or options, before any work where it can be known then. A
    run that skips more than `max_bad_fraction` of its inputs, or leaves a class without a train
    sample, still writes everything and lists why under the manifest's "errors" (loaders refuse it).
    """
    options = dict(val_fraction=val_fraction, seed=seed, classes=str(classes_file) if classes_file else None,
                   quality=quality, max_side=max_side, min_side=min_side, max_count=max_count,
                   max_size=max_size, max_bad_fraction=max_bad_fraction)
    check_options(options)
    out = Path(out).resolve()
    with contextlib.ExitStack() as stack:
        inputs = open_inputs(src, out, stack=stack, classes_file=classes_file, image_column=image_column,
                             label_column=label_column, splits=splits)
        prepare_output(out, overwrite=overwrite)
        start = time.perf_counter()
        # Every input is checked (and converted where needed) before the val split is drawn from the
        # valid ones; converted JPEGs wait in a staging file, so each input is decoded once.
        staging = out / ".staged.tmp"
        try:
            with open(staging, "w+b") as stage:
                staged, digests, converted, bad = check_inputs(inputs.items(), total=inputs.total, stage=stage,
                                                      keep_all=inputs.keep_all, workers=workers, progress=progress,
                                                      opts=EncodeOptions(quality, max_side, min_side))
                classes = inputs.finish()
                skipped = inputs.skipped + bad
                split_samples, duplicates = split_valid(inputs.files, digests, val_fraction=val_fraction,
                                                        label={name: i for i, name in enumerate(classes)},
                                                        rng=random.Random(seed))
                writers, per_class = write_splits(split_samples, out=out, folder=inputs.folder, staged=staged,
                                                  stage=stage, max_count=max_count, max_size=max_size, progress=progress)
        except OSError as e:
            raise ShardingError(f"{e.strerror or e} ({e.filename or out}) while writing {out}; the complete shards "
                                f"stay, no manifest was written: free space (or fix the permissions) and rerun "
                                f"with --overwrite") from None
        finally:
            staging.unlink(missing_ok=True)
        elapsed = time.perf_counter() - start

    n_inputs = len(staged) + len(skipped)
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": inputs.description,
        "layout": inputs.layout,
        **inputs.details,
        "options": options,
        "num_classes": len(classes),
        "inputs": n_inputs,
        "splits": {
            split: {
                "samples": sum(per_class[split].values()),
                "per_class": {name: per_class[split][i] for i, name in enumerate(classes)},
                "shards": writers[split].shards,
            }
            for split in SPLITS
        },
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "converted_counts": dict(sorted(Counter(r for c in converted for r in c["reasons"]).items())),
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "ignored_counts": dict(sorted(Counter(os.path.splitext(p)[1].lower() or "(none)"
                                              for p in inputs.ignored).items())),
        "ignored": sorted(inputs.ignored)[:LISTED],
        "system_folders_counts": dict(sorted(Counter(f"{Path(p).name} ({left_out(Path(p).name)})"
                                                     for p in inputs.system).items())),
        "system_folders": sorted(inputs.system)[:LISTED],
        "duplicates": duplicates,
        "converted": sorted(converted, key=lambda c: c["path"]),
        "errors": unusable(inputs.files, classes, per_class, skipped=len(skipped), inputs=n_inputs,
                           max_bad_fraction=max_bad_fraction, manifest=out / MANIFEST_FILE),
    }
    (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1) + "\n")
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "elapsed_s": elapsed}


def summary(manifest: dict, out: Path) -> str:
    lines = []
    shown = [split for split, info in manifest["splits"].items() if split != "test" or info["samples"]]
    for split in shown:
        info = manifest["splits"][split]
        lines.append(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    skipped = manifest["skipped_counts"]
    lines.append(f"skipped {sum(skipped.values())}" + (": " + ", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else ""))
    dup = manifest["duplicates"]
    if dup["copies"]:
        lines.append(f"duplicates: {dup['copies']} inputs are byte-identical copies of others"
                     + (", each kept in one split with its copies" if dup["split_here"] else ""))
    if n := dup["across_classes"]["count"]:
        lines.append(f"duplicates: {n} images are filed under more than one class"
                     + (" (all their copies went to train)" if dup["split_here"] else "")
                     + "; manifest: duplicates.across_classes")
    if n := dup["across_splits"]["count"]:
        splits = Counter(d["split"] for d in dup["across_splits"]["inputs"])
        lines.append(f"warning: {n} {'/'.join(sorted(splits))} images are byte-identical to train images, so evals "
                     f"count images the model trained on; manifest: duplicates.across_splits")
    if ignored := manifest["ignored_counts"]:
        lines.append(f"ignored {sum(ignored.values())} files that are no images: "
                     + ", ".join(f"{k} {v}" for k, v in ignored.items()))
    if system := manifest["system_folders_counts"]:
        lines.append(f"left out {sum(system.values())} system folders (no data): "
                     + ", ".join(f"{k} {v}" for k, v in system.items()))
    conv = manifest["converted_counts"]
    lines.append(f"re-encoded {len(manifest['converted'])}" + (": " + ", ".join(f"{k} {v}" for k, v in conv.items()) if conv else ""))
    done = sum(i["samples"] for i in manifest["splits"].values()) + sum(skipped.values())
    lines.append(f"{done} inputs in {manifest['elapsed_s']:.1f} s ({done / max(manifest['elapsed_s'], 1e-9):.0f} images/s)")
    lines.append(f"wrote {out} ({MANIFEST_FILE}, {CLASSES_FILE}, {', '.join(f'{split}/' for split in shown)})")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with K/M/G)") from None


def parse_splits(text: str) -> dict[str, str]:
    splits = {}
    for part in filter(None, text.split(",")):
        ours, sep, theirs = part.partition("=")
        if not sep or ours.strip() not in SPLITS or not theirs.strip():
            raise argparse.ArgumentTypeError(f"{part!r}: expected SPLIT=NAME with SPLIT one of {', '.join(SPLITS)}")
        splits[ours.strip()] = theirs.strip()
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", help=f"image folder; Hugging Face dataset (a save_to_disk folder, Parquet files: a "
                        f"folder or glob, or hf:NAME[:CONFIG]); or one of {', '.join(BUILTIN_SOURCES)}")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="val share per class (class-folder layout; 0: no val)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split and the shuffle")
    parser.add_argument("--classes", type=Path, help="class names in id order (JSON list or one per line)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--max-side", type=int, help="downsize images whose longer side exceeds this")
    parser.add_argument("--min-side", type=int, default=1, help="skip images whose shorter side is below this")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--max-size", type=parse_size, default="1G", help="bytes per shard at most (K/M/G suffixes)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail when more inputs are skipped")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty OUT")
    hf = parser.add_argument_group("Hugging Face datasets")
    hf.add_argument("--image-column", help="the image column; unset: the one Image feature")
    hf.add_argument("--label-column", help="the label column; unset: the one ClassLabel feature, else label or labels")
    hf.add_argument("--splits", type=parse_splits, help="which dataset split is which, e.g. train=train,val=test; unset: train; validation, "
                    "valid, val or dev; test (splits not named are left out)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        manifest = make_shards(
            src=args.src, out=args.out, val_fraction=args.val_fraction, seed=args.seed, classes_file=args.classes,
            quality=args.quality, max_side=args.max_side, min_side=args.min_side, max_count=args.max_count,
            max_size=args.max_size, max_bad_fraction=args.max_bad_fraction, workers=args.workers, overwrite=args.overwrite,
            image_column=args.image_column, label_column=args.label_column, splits=args.splits,
        )
    except ShardingError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as e:
        sigint = isinstance(e, KeyboardInterrupt)
        print(f"make_shards: {interrupted(args.out.resolve(), 'Ctrl-C' if sigint else 'SIGTERM')}", file=sys.stderr)
        return 128 + (signal.SIGINT if sigint else signal.SIGTERM)
    print(summary(manifest, args.out))
    for error in manifest["errors"]:
        print(f"make_shards: error: {error}", file=sys.stderr)
    return 1 if manifest["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
