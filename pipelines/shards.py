"""The on-disk dataset format that `tools/make_shards.py` writes and the loaders read.

    OUT/classes.json            class names in id order (id2label)
    OUT/manifest.json           counts, shards (+ sha256), skipped and converted inputs, options
    OUT/{train,val,test}/shard-NNNNNN.tar   GNU tar, members `<key>.cls` (ASCII id) and `<key>.jpg`
    OUT/{train,val,test}/shard-NNNNNN.idx   DALI webdataset index (the format of DALI's `wds2idx`)

Everything that knows this layout lives here, so the writer, the verifier and the
training loaders cannot disagree about it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.json"
SPLITS = ("train", "val", "test")
# The names a source may give its splits (case-insensitive), as HF imagefolder, timm, torchvision and
# Hugging Face datasets name them, and the split each becomes
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}
MANIFEST_FORMAT = "image-shards/1"
INDEX_VERSION = "v1.2"
BASELINE_SOF = 0xC0
CLEAN_JPEG_MODES = ("RGB", "L")


class ShardFormatError(ValueError):
    """A shard folder that does not match the format: missing files, bad manifest."""



def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or its old content, never a part: written beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")  # unique across hosts, whose PIDs may be equal
    tmp.write_text(text)
    os.replace(tmp, path)


def class_name(name: str) -> str:
    """A class's name as classes.json holds it: Unicode NFC. A Mac writes file names decomposed
    (NFD), so the same letters in a folder copied from it, in another split's folder, in a label
    list or in a model's id2label are other strings unless normalized."""
    return unicodedata.normalize("NFC", name)


def sample_key(relpath: str) -> str:
    """A WebDataset key for a source file: readable, stable, unique, and safe for every reader.

    Readers split key from extension at the first dot and DALI's index is space separated,
    so only `[A-Za-z0-9_-]` survive; the hash of the full relative path keeps keys unique
    when two names sanitise alike (`a.b.jpg` vs `a_b.jpg`).
    """
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem.replace("/", "__")).strip("_")[-120:]
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{slug}-{digest}" if slug else digest


def jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...) of a JPEG, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def jpeg_problems(img: Image.Image, data: bytes) -> list[str]:
    """Why an opened image is not a clean JPEG shard member (empty list: it is one).

    Clean means what both DALI decoders take and what decodes to RGB: baseline (the A100/H100
    hardware decoder rejects progressive), 8-bit RGB/YCbCr or grayscale, no EXIF rotation.
    """
    if img.format != "JPEG":
        return [f"format_{(img.format or 'unknown').lower()}"]
    problems = []
    if img.mode not in CLEAN_JPEG_MODES:
        problems.append(f"jpeg_{img.mode.lower()}")
    marker = jpeg_frame_marker(data)
    if marker == 0xC2:
        problems.append("jpeg_progressive")
    elif marker != BASELINE_SOF:
        problems.append("jpeg_not_baseline")
    if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
        problems.append("exif_rotated")
    return problems


def decode_fully(img: Image.Image) -> None:
    """Decode every byte of an opened image; raises OSError on truncated or corrupt data.

    JPEGs are decoded at 1/8 scale: libjpeg still entropy-decodes every coefficient of every
    block (that is where truncation and corruption show), it only skips the full-size IDCT,
    which makes validation several times cheaper than a full decode.
    """
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


# --- the DALI index ---------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """One tar member as DALI's index sees it."""

    ext: str
    offset: int  # of the data, past every header (long-name headers included)
    size: int
    name: str


def format_index(samples: list[list[Member]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def read_index(path: Path) -> list[list[Member]]:
    """Parse a DALI webdataset index file; raises ShardFormatError naming the file and line."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardFormatError(f"{path}: not a DALI index (first line {lines[:1]})")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardFormatError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        try:
            samples.append([
                Member(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ])
        except ValueError as e:
            raise ShardFormatError(f"{path}:{lineno}: {e}") from None
    if len(samples) != int(header[1]):
        raise ShardFormatError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples


# --- writing ---------------------------------------------------------------------------

def _tar_header_template() -> bytes:
    info = tarfile.TarInfo("")
    info.mtime, info.mode = 0, 0o644
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_HEADER = _tar_header_template()


def tar_header(name: str, size: int) -> bytes:
    """The GNU tar header(s) of a regular member with our fixed metadata.

    Byte-identical to `tarfile.TarInfo.tobuf` (a test holds it to that) but filled into a
    template: tarfile builds every field in Python, which was a third of the writer's cost.
    """
    encoded = name.encode("utf-8")
    if len(encoded) >= 100 or size >= 8**11:  # long-name / large-file headers: tarfile's job
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_HEADER)
    header[0 : len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


@dataclass
class ShardWriter:
    """Writes samples into size- and count-limited GNU tar shards, each atomically with its index.

    A shard is written under a temporary name and renamed only once tar and index are both
    complete, so an interrupted run never leaves a `.tar` that looks finished. Member metadata
    is fixed (mtime 0, root, 0644), so the same samples give byte-identical shards. Data goes
    out in one unbuffered call per member and is hashed on the way, which keeps writing cheap
    next to validating.
    """

    folder: Path
    max_count: int
    max_size: int
    shards: list[dict] = field(default_factory=list)
    _file: io.FileIO | None = None
    _sha256: object = None
    _offset: int = 0
    _samples: list[list[Member]] = field(default_factory=list)

    def write(self, key: str, label: int, jpeg: bytes) -> None:
        members = []
        for ext, data in (("cls", str(label).encode("ascii")), ("jpg", jpeg)):
            name = f"{key}.{ext}"
            members.append((ext, name, tar_header(name, len(data)), data))
        size = sum(len(header) + len(data) + -len(data) % tarfile.BLOCKSIZE for _, _, header, data in members)
        if self._file is not None and (
            len(self._samples) >= self.max_count or self._offset + size > self.max_size
        ):
            self.close()
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file, self._sha256, self._offset = io.FileIO(self._tmp_path(), "w"), hashlib.sha256(), 0
        sample = []
        for ext, name, header, data in members:
            self._put(header)
            sample.append(Member(ext, self._offset, len(data), name))
            self._put(data)
            self._put(bytes(-len(data) % tarfile.BLOCKSIZE))
        self._samples.append(sample)

    def close(self) -> None:
        if self._file is None:
            return
        end = 2 * tarfile.BLOCKSIZE  # end-of-archive, then padding to a whole record, as tar does
        self._put(bytes(end + -(self._offset + end) % tarfile.RECORDSIZE))
        os.fsync(self._file.fileno())
        self._file.close()
        tmp, name = self._tmp_path(), shard_name(len(self.shards))
        index_tmp = tmp.with_suffix(".idx.tmp")
        index_tmp.write_text(format_index(self._samples))
        os.replace(index_tmp, self.folder / index_name(name))
        os.replace(tmp, self.folder / name)
        self.shards.append({
            "name": name,
            "index": index_name(name),
            "samples": len(self._samples),
            "bytes": self._offset,
            "sha256": self._sha256.hexdigest(),
        })
        self._file, self._samples = None, []

    def _put(self, data: bytes) -> None:
        self._sha256.update(data)
        view, written = memoryview(data), 0
        while written < len(data):  # FileIO may write short
            written += self._file.write(view[written:])
        self._offset += len(data)

    def _tmp_path(self) -> Path:
        return self.folder / f".{shard_name(len(self.shards))}.tmp"


# --- reading and verifying ---------------------------------------------------------------

class SampleTable:
    """Where every sample of a split lives, from the parsed DALI index of each tar (`read_index`),
    and reading sample i with one `pread` (a sample's members are adjacent in the tar: `.cls`,
    then `.jpg`).

    About 100 bytes a sample in numpy arrays (ImageNet's 1.28M: about 130 MB with the keys), so
    that a loader can visit the samples in any order.
    """

    def __init__(self, tars: list[Path], indexes: list[list[list[Member]]]):
        self.tars = [Path(t) for t in tars]
        keys, rows = [], []
        for n, (tar, index) in enumerate(zip(self.tars, indexes, strict=True)):
            for sample in index:
                members = {m.ext: m for m in sample}
                if set(members) != {"cls", "jpg"}:
                    raise ShardFormatError(f"{tar}: sample {sample[0].name}: members {sorted(members)}, expected cls and jpg")
                jpg, cls = members["jpg"], members["cls"]
                start = min(jpg.offset, cls.offset)
                keys.append(jpg.name.split(".", 1)[0])
                rows.append((n, start, max(jpg.offset + jpg.size, cls.offset + cls.size) - start,
                             jpg.offset - start, jpg.size, cls.offset - start, cls.size))
        self.keys = np.array(keys, dtype=bytes)  # fixed-width bytes: a Python str per key would triple the size
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 7)
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        return f"shard {self.tars[self.rows[i, 0]]}, sample {self.key(i)}"

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def read(self, i: int) -> tuple[bytes, bytes]:
        """(jpg bytes, cls bytes) of sample i."""
        shard, start, length, jpg_at, jpg_size, cls_at, cls_size = (int(v) for v in self.rows[i])
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.tars[shard], os.O_RDONLY)
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise ShardFormatError(f"{self.where(i)}: the tar ends before the sample (truncated after indexing)")
        return data[jpg_at : jpg_at + jpg_size], data[cls_at : cls_at + cls_size]


def load_manifest(root: Path, *, allow_errors: bool = False) -> dict:
    """The manifest of a shard folder; a clear error when it is missing, from another tool,
    or records a failed run (too many skipped inputs, a class without train images)."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path} not found: " + _not_shards(Path(root)))
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardFormatError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest["errors"] and not allow_errors:
        raise ShardFormatError(f"{path} records a failed make_shards run: {manifest['errors'][0]}; fix the source and rerun")
    return manifest


def _not_shards(root: Path, *, look_at: int = 5000) -> str:
    """What a folder without a manifest is, for the error: missing, a source to make shards of
    (images, or a Hugging Face dataset: found among its first `look_at` entries), or unknown."""
    if not root.exists():
        return f"{root} does not exist"
    if root.name in SPLITS and (root.parent / MANIFEST_FILE).is_file():
        return f"{root} is the {root.name} split of the shards in {root.parent}: pass {root.parent}"
    images = set(Image.registered_extensions())
    seen = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in images or suffix in (".parquet", ".arrow"):
                what = "images" if suffix in images else "a dataset"
                return (f"{root} holds {what} ({Path(folder, name)}), not shards: make them with `python "
                        f"tools/make_shards.py {root} SHARDS_DIR`, then pass --data SHARDS_DIR")
        seen += len(files) + len(dirs)
        if seen > look_at:
            break
    return f"is {root} a folder written by tools/make_shards.py (an interrupted run writes no manifest)?"


def load_classes(root: Path) -> list[str]:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path} not found")
    return json.loads(path.read_text())


def _verify_one_shard(job: tuple[Path, dict, int, bool]) -> tuple[list[str], list[str], Counter]:
    """Problems, keys and label counts of one shard (runs in a worker process)."""
    path, record, num_classes, decode = job
    problems: list[str] = []
    keys: list[str] = []
    labels: Counter = Counter()
    if not path.is_file():
        return [f"{path}: missing"], keys, labels
    if (size := path.stat().st_size) != record["bytes"]:
        problems.append(f"{path}: {size} bytes, manifest says {record['bytes']}")
    if file_sha256(path) != record["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (modified after sharding)")
    try:
        index = read_index(path.parent / record["index"])
    except (OSError, ShardFormatError) as e:
        return problems + [f"{path.parent / record['index']}: {e}"], keys, labels
    if len(index) != record["samples"]:
        problems.append(f"{path}: index has {len(index)} samples, manifest says {record['samples']}")
    indexed = {m.name: m for sample in index for m in sample}
    members = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                members.add(info.name)
                key, _, ext = info.name.partition(".")
                entry = indexed.get(info.name)
                if entry is None or (entry.offset, entry.size) != (info.offset_data, info.size):
                    problems.append(f"{path}: member {info.name} does not match the index")
                    continue
                data = tar.extractfile(info).read()
                if ext == "cls":
                    keys.append(key)
                    if not data.isdigit() or int(data) >= num_classes:
                        problems.append(f"{path}: sample {key}: bad label {data[:20]!r}")
                    else:
                        labels[int(data)] += 1
                elif ext == "jpg" and decode and (problem := jpeg_problem(data)):
                    problems.append(f"{path}: sample {key}: {problem}")
    except (OSError, tarfile.TarError) as e:
        return problems + [f"{path}: unreadable tar ({e})"], keys, labels
    for name in sorted(indexed.keys() - members):
        problems.append(f"{path}: indexed member {name} is not in the tar")
    for sample in index:
        if sorted(m.ext for m in sample) != ["cls", "jpg"]:
            problems.append(f"{path}: sample {sample[0].name}: members {[m.ext for m in sample]}")
    return problems, keys, labels


def jpeg_problem(data: bytes) -> str | None:
    """Why a shard member's JPEG bytes would not serve (None: they decode cleanly)."""
    try:
        img = Image.open(io.BytesIO(data))
        problems = jpeg_problems(img, data)
        decode_fully(img)
    except Exception as e:  # any decoder failure is a finding about the data, not our bug
        return f"does not decode ({e})"
    return f"not a clean JPEG ({', '.join(problems)})" if problems else None


def verify_shards(root: Path, *, decode: bool = True, workers: int | None = None) -> list[str]:
    """Everything wrong with a shard folder against its manifest; an empty list when sound.

    Checks each shard's size and sha256, that its index matches the tar byte for byte, that
    every sample has a label in range and (with `decode`) a JPEG that decodes, that keys are
    unique, and that per-split and per-class counts equal the manifest's.
    """
    root = Path(root)
    manifest = load_manifest(root, allow_errors=True)
    classes = load_classes(root)
    problems = [f"{root / MANIFEST_FILE}: {e}" for e in manifest["errors"]]
    if len(classes) != manifest["num_classes"]:
        problems.append(f"{root / CLASSES_FILE}: {len(classes)} classes, manifest says {manifest['num_classes']}")
    for split, info in manifest["splits"].items():
        jobs = [(root / split / rec["name"], rec, len(classes), decode) for rec in info["shards"]]
        with Pool(workers or os.cpu_count()) as pool:
            results = pool.map(_verify_one_shard, jobs, chunksize=1)
        keys: Counter = Counter()
        labels: Counter = Counter()
        for shard_problems, shard_keys, shard_labels in results:
            problems += shard_problems
            keys.update(shard_keys)
            labels.update(shard_labels)
        problems += [f"{split}: key {k} appears {n} times" for k, n in keys.items() if n > 1]
        if sum(labels.values()) != info["samples"]:
            problems.append(f"{split}: {sum(labels.values())} samples in shards, manifest says {info['samples']}")
        for i, name in enumerate(classes):
            if labels[i] != info["per_class"].get(name, 0):
                problems.append(f"{split}: class {name!r} has {labels[i]} samples, manifest says {info['per_class'].get(name, 0)}")
    return problems
