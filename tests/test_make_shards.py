"""tools/make_shards.py and tools/verify_shards.py on real photos, end to end."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import LONG_NAME, ROOT, VALID_KINDS, encode, photo, read_with_dali, write, write_bad_files, write_class
from make_shards import make_shards
from pipelines.shards import (
    ShardFormatError, jpeg_frame_marker, load_manifest, read_index, sample_key, tar_header, verify_shards,
)

MAKE_SHARDS = [sys.executable, str(ROOT / "tools" / "make_shards.py")]


def run_tool(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE_SHARDS, *map(str, args)], capture_output=True, text=True, **kwargs)


def shard_members(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample in a split, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def expected_keys(src: Path, classes: list[str]) -> dict[str, int]:
    """key -> label of every image file under SRC/<class>/ (all valid in the fixture)."""
    return {
        sample_key(p.relative_to(src).as_posix()): classes.index(p.relative_to(src).parts[0])
        for p in src.rglob("*")
        if p.is_file() and p.suffix.lower() not in (".txt", ".md") and not p.name.startswith(".")
    }


def test_class_folders_round_trip_through_dali_and_webdataset(class_folders, tmp_path):
    out = tmp_path / "out"
    result = run_tool(class_folders, out, "--val-fraction", "0.25", "--max-count", "7", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "train: 28 samples in 4 shard(s)" in result.stdout

    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["cat", "dog.big", "zebra"]
    manifest = load_manifest(out)
    # the source itself passed where shards go: the error says what it is and how to make them
    with pytest.raises(ShardFormatError, match=rf"{class_folders} holds images \({class_folders}/cat/.*\), not "
                       rf"shards: make them with `python tools/make_shards.py {class_folders} SHARDS_DIR`"):
        load_manifest(class_folders)
    with pytest.raises(ShardFormatError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(ShardFormatError, match=f"{out / 'val'} is the val split of the shards in {out}: pass {out}$"):  # a split's folder passed for the shards
        load_manifest(out / "val")
    # 13 cat images (12 kinds + the long name), 12 dog.big, 12 zebra; val = round(n / 4)
    assert manifest["splits"]["val"]["per_class"] == {"cat": 3, "dog.big": 3, "zebra": 3}
    assert manifest["splits"]["train"]["per_class"] == {"cat": 10, "dog.big": 9, "zebra": 9}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [7, 7, 7, 7]
    assert manifest["skipped_counts"] == {}  # a licence and a README are no inputs, so nothing bad
    assert manifest["ignored_counts"] == {".md": 1, ".txt": 1}
    assert manifest["ignored"] == ["README.md", "dog.big/LICENSE.txt"]
    assert "ignored 2 files that are no images: .md 1, .txt 1" in result.stdout
    assert manifest["inputs"] == 37
    reasons = Counter(r for _, r in VALID_KINDS.values() if r)
    assert manifest["converted_counts"] == {r: 3 * n for r, n in reasons.items()}

    expected = expected_keys(class_folders, classes)
    assert len(expected) == 37
    for reader in ("dali", "webdataset"):
        seen = []
        for split in ("train", "val"):
            if reader == "dali":
                rows = read_with_dali(out / split)
                assert all(shape[2] == 3 for _, _, shape in rows)  # decodes to RGB
                seen += [(key, label) for key, label, _ in rows]
            else:
                urls = [str(p) for p in sorted((out / split).glob("*.tar"))]
                seen += [(s["__key__"], s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")]
        assert len(seen) == len(set(seen)) == 37, reader  # nothing duplicated
        assert dict(seen) == expected, reader  # nothing lost, every label right


def test_long_nested_names_index_past_gnu_long_name_headers(class_folders, tmp_path):
    make_shards(src=class_folders, out=tmp_path / "out", val_fraction=0, progress=False, max_bad_fraction=0.1)
    key = sample_key(f"cat/{LONG_NAME}")
    assert len(key) + len(".jpg") > 100 and "." not in key and " " not in key
    tar_path = tmp_path / "out" / "train" / "shard-000000.tar"
    entry = next(m for s in read_index(tar_path.with_suffix(".idx")) for m in s if m.name == f"{key}.jpg")
    with open(tar_path, "rb") as f:
        f.seek(entry.offset)
        assert f.read(entry.size) == (class_folders / "cat" / LONG_NAME).read_bytes()  # baseline: copied


def test_converted_images_are_clean_and_faithful(class_folders, tmp_path):
    out = tmp_path / "out"
    make_shards(src=class_folders, out=out, val_fraction=0, progress=False, max_bad_fraction=0.1)
    samples = shard_members(out, "train")

    def decoded(name: str, cls: str = "zebra") -> tuple[bytes, Image.Image]:
        data = samples[sample_key(f"{cls}/{name}")]["jpg"]
        return data, Image.open(io.BytesIO(data))

    for name in VALID_KINDS:
        data, img = decoded(name)
        assert img.format == "JPEG" and jpeg_frame_marker(data) == 0xC0, name  # baseline
        assert img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1, name
    assert decoded("baseline.jpg")[0] == (class_folders / "zebra" / "baseline.jpg").read_bytes()
    assert decoded("gray.jpeg")[1].mode == "L"

    source = Image.open(class_folders / "zebra" / "rotated.jpg")
    assert decoded("rotated.jpg")[1].size == source.size[::-1]  # rotation applied once

    alpha = np.asarray(decoded("alpha.png")[1], dtype=float)
    assert alpha[:, : alpha.shape[1] // 2 - 4].min() > 245  # transparent half composited over white

    deep = np.asarray(decoded("deep.png")[1], dtype=float)
    reference = np.asarray(Image.open(class_folders / "zebra" / "deep.png"), dtype=float) / 257
    assert deep.shape == reference.shape and np.abs(deep - reference).mean() < 2  # scaled, not clipped

    cmyk = np.asarray(decoded("cmyk.jpg")[1].convert("RGB"), dtype=float)
    original = np.asarray(Image.open(class_folders / "zebra" / "cmyk.jpg").convert("RGB"), dtype=float)
    assert np.abs(cmyk - original).mean() < 3


def test_max_side_downsizes_keeping_aspect(class_folders, tmp_path):
    out = tmp_path / "out"
    manifest = make_shards(src=class_folders, out=out, val_fraction=0, max_side=50, progress=False, max_bad_fraction=0.1)
    assert manifest["converted_counts"]["downsized"] == 37
    img = Image.open(io.BytesIO(shard_members(out, "train")[sample_key("cat/photo.png")]["jpg"]))
    source = Image.open(class_folders / "cat" / "photo.png")
    assert max(img.size) == 50 and abs(img.width / img.height - source.width / source.height) < 0.03


def test_train_val_layout_kept_as_given_and_bad_inputs_counted(tmp_path):
    src = tmp_path / "src"
    valid = {("train", "ant"): write_class(src / "train" / "ant", 0), ("train", "bee"): write_class(src / "train" / "bee", 20)}
    valid[("val", "ant")] = write_class(src / "val" / "ant", 40, dict(list(VALID_KINDS.items())[:5]))
    valid[("val", "bee")] = 0
    bad = write_bad_files(src / "train" / "bee")
    bad_val = write_bad_files(src / "val" / "bee")
    write(src / "val" / "bee" / "ok", encode(photo(3), "JPEG"))  # a JPEG without extension: an input
    write(src / "train" / "ant" / "Thumbs.db", b"\xd0\xcf\x11\xe0 Windows' thumbnail cache")
    valid[("val", "bee")] += 1
    # what a Mac's zip and a Synology NAS leave beside the data: a split-like top level stays a split
    # layout, and the NAS's JPEG thumbnails of the class's images are no samples
    write(src / "__MACOSX" / "train" / "ant" / "._a.jpg", b"\x00\x05\x16\x07 AppleDouble")
    write(src / "train" / "ant" / "@eaDir" / "a.jpg" / "SYNOFILE_THUMB_M.jpg", encode(photo(1), "JPEG"))
    write(src / "val" / "ant" / "@eaDir" / "SYNOFILE_THUMB_S.jpg", encode(photo(2), "JPEG"))
    write(src / "train" / "@eaDir" / "ant" / "SYNOFILE_THUMB_S.jpg", encode(photo(3), "JPEG"))  # not a class

    result = run_tool(src, tmp_path / "out", "--min-side", "8", "--max-bad-fraction", "0.5", "--workers", "1")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "out")
    assert manifest["layout"] == "train_val"
    for (split, cls), n in valid.items():
        assert manifest["splits"][split]["per_class"][cls] == n, (split, cls)
    expected_skips = Counter(bad) + Counter(bad_val)
    assert manifest["skipped_counts"] == dict(expected_skips)
    assert len(manifest["skipped"]) == sum(expected_skips.values())
    assert {"path": "train/bee/truncated.jpg", "reason": "truncated"}.items() <= next(
        s for s in manifest["skipped"] if s["path"] == "train/bee/truncated.jpg").items()
    assert {"path": "val/bee/IMG_0001.HEIC", "reason": "unsupported_format"}.items() <= next(
        s for s in manifest["skipped"] if s["path"] == "val/bee/IMG_0001.HEIC").items()
    assert "skipped 10: empty 2, too_small 2, truncated 2, undecodable 2, unsupported_format 2" in result.stdout
    assert manifest["ignored"] == ["train/ant/Thumbs.db", "train/bee/notes.txt", "val/bee/notes.txt"]
    assert manifest["system_folders"] == ["__MACOSX", "train/@eaDir", "train/ant/@eaDir", "val/ant/@eaDir"]
    assert manifest["system_folders_counts"] == {"@eaDir (Synology thumbnails)": 3, "__MACOSX (macOS archive metadata)": 1}
    assert ("left out 4 system folders (no data): @eaDir (Synology thumbnails) 3, __MACOSX (macOS archive "
            "metadata) 1") in result.stdout
    assert verify_shards(tmp_path / "out", workers=1) == []


def test_too_many_bad_inputs_fail_but_keep_the_manifest(tmp_path):
    src = tmp_path / "src"
    inputs = write_class(src / "ant", 0) + write_class(src / "bee", 20) + 5
    write_bad_files(src / "ant")
    out = tmp_path / "out"
    result = run_tool(src, out, "--min-side", "8")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"make_shards: error: 5 of {inputs} inputs skipped ({5 / inputs:.1%} > --max-bad-fraction 1.0%); "
        f"the list is under 'skipped' in {out.resolve() / 'manifest.json'}"
    )
    with pytest.raises(ShardFormatError, match="records a failed make_shards run"):
        load_manifest(out)
    assert len(load_manifest(out, allow_errors=True)["skipped"]) == 5


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "only_bad", "inside", "one_class", "unpacked",
                                  "unpacked_splits", "unpacked_in_train", "shards"])
def test_unusable_sources_are_one_line_errors(tmp_path, case):
    """A source that would make no usable shards is refused before any work, in one line. One class
    folder would train a classifier of one class to 100% top-1 (an archive unpacked into a folder of
    its own gives one): refused, and where the classes seem to be is said."""
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "no_images":
        write_class(src / "ant", 0)
        write(src / "bee" / "notes.txt", b"text")
    elif case == "only_bad":
        write_class(src / "ant", 0)
        write(src / "bee" / "broken.jpg", b"\xff\xd8 not really")
    elif case == "one_class":
        write_class(src / "ant", 0)
    elif case.startswith("unpacked"):
        inner = {"unpacked": src / "flowers", "unpacked_splits": src / "flowers" / "train",
                 "unpacked_in_train": src / "train" / "flowers"}[case]
        for n, name in enumerate(("ant", "bee", "wasp")):
            write(inner / name / "0.jpg", encode(photo(n), "JPEG"))
        if case == "unpacked_splits":
            write(src / "flowers" / "val" / "ant" / "0.jpg", encode(photo(3), "JPEG"))
    elif case == "shards":  # the output of this tool passed as its source
        for n, name in enumerate(("ant", "bee")):
            write(tmp_path / "images" / name / "0.jpg", encode(photo(n), "JPEG"))
        make_shards(src=tmp_path / "images", out=src, val_fraction=0, progress=False)
    out = src / "out" if case == "inside" else tmp_path / "out"
    if case == "inside":
        write_class(src / "ant", 0)
    result = run_tool(src, out, "--max-bad-fraction", "1")
    expected = {
        "missing": (2, f"source folder {src} does not exist"),
        "empty": (2, f"{src} has no class folders"),
        "no_images": (2, f"class folder {src / 'bee'} has no image files"),
        "only_bad": (1, "class 'bee' has no valid train image"),
        "inside": (2, "must not be inside SRC"),
        "one_class": (2, f"{src} has one class folder, ant/: a classifier needs two classes or more\n"),
        "shards": (2, f"{src} holds shards written by this tool (manifest.json), not images: train on it with "
                      f"--data {src}\n"),
        "unpacked": (2, f"{src} has one class folder, flowers/: a classifier needs two classes or more; its 3 folders "
                        f"(ant, bee, wasp) look like the classes: pass {src / 'flowers'} as SRC\n"),
        "unpacked_splits": (2, f"{src} has one class folder, flowers/: a classifier needs two classes or more; "
                               f"{src / 'flowers'} holds the split folders (train, val): pass it as SRC\n"),
        "unpacked_in_train": (2, f"{src / 'train'} has one class folder, flowers/: a classifier needs two classes or "
                                 f"more; its 3 folders (ant, bee, wasp) look like the classes: move them up into "
                                 f"{src / 'train'}\n"),
    }[case]
    assert result.returncode == expected[0]
    assert expected[1] in result.stderr and "Traceback" not in result.stderr
    if case == "only_bad":  # its train images are all of one class now: that is said too
        assert "one class alone, 'ant', has valid train images: a classifier needs two classes or more" in result.stderr


def test_multi_digit_labels_survive_the_round_trip(tmp_path):
    src = tmp_path / "src"
    for c in range(120):
        for i in range(2):
            write(src / f"class_{c:03d}" / f"{i}.jpg", encode(photo(c * 2 + i, (16, 12)), "JPEG"))
    out = tmp_path / "out"
    make_shards(src=src, out=out, val_fraction=0, max_count=50, progress=False)
    rows = read_with_dali(out / "train", batch_size=32)
    labels = Counter(label for _, label, _ in rows)
    assert labels == {c: 2 for c in range(120)}
    urls = [str(p) for p in sorted((out / "train").glob("*.tar"))]
    assert Counter(s["cls"] for s in wds.WebDataset(urls, shardshuffle=False).decode()) == labels


def test_same_input_gives_byte_identical_shards(digits_folder, tmp_path):
    runs = []
    for n, workers in enumerate((1, 2)):
        out = tmp_path / f"out{n}"
        make_shards(src=digits_folder, out=out, max_count=500, workers=workers, progress=False)
        runs.append(out)
    first, second = (load_manifest(r) for r in runs)
    assert first == second
    assert len(first["splits"]["train"]["shards"]) == 4
    for split in ("train", "val"):
        for a in sorted((runs[0] / split).iterdir()):
            assert a.read_bytes() == (runs[1] / split / a.name).read_bytes(), a.name
    # a different seed gives another split and order
    other = make_shards(src=digits_folder, out=tmp_path / "seed1", max_count=500, seed=1, progress=False)
    assert other["splits"]["train"]["shards"][0]["sha256"] != first["splits"]["train"]["shards"][0]["sha256"]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_run_leaves_no_complete_looking_shard(digits_folder, tmp_path, how):
    """Killed, or stopped by Ctrl-C (SIGINT to the terminal's process group) or SIGTERM (a
    scheduler's time limit): the shards written stay, no manifest; stopped, it says so in one line."""
    out, flag, errors = tmp_path / "out", tmp_path / "paused", tmp_path / "stderr"
    # Pause inside the 10th write, with shards of 4: two shards done, the third one open.
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT / 'tools')!r})
import make_shards
from pathlib import Path
from pipelines import shards
write, calls = shards.ShardWriter.write, []
def paused_write(self, *args):
    calls.append(1)
    if len(calls) == 10:
        Path({str(flag)!r}).touch()
        time.sleep(600)
    return write(self, *args)
shards.ShardWriter.write = paused_write
sys.exit(make_shards.main([{str(digits_folder)!r}, {str(out)!r}, "--max-count", "4", "--workers", "2"]))
"""
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the run never reached the pause"
    os.killpg(proc.pid, getattr(signal, how))
    code = proc.wait(timeout=60)

    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        ".shard-000002.tar.tmp", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]
    if how != "SIGKILL":
        err = errors.read_text()
        assert code == 128 + getattr(signal, how) and "Traceback" not in err, err
        stopped = err.strip().splitlines()[-1]
        assert stopped == (f"make_shards: stopped by {'Ctrl-C' if how == 'SIGINT' else how}: the shards written so "
                           f"far in {out} are incomplete (no manifest.json, so no loader takes them); rerun with "
                           f"--overwrite"), err
        assert not (out / ".staged.tmp").exists()
    for tar_path in sorted((out / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar}
        indexed = {m.name: (m.offset, m.size) for s in read_index(tar_path.with_suffix(".idx")) for m in s}
        assert members == indexed and len(indexed) == 8

    refused = run_tool(digits_folder, out)
    assert refused.returncode == 2 and refused.stderr == (
        f"make_shards: error: {out} holds shards without a manifest.json, which no loader takes (an interrupted "
        f"run's); pass --overwrite to replace the shards in it\n")
    assert run_tool(digits_folder, out, "--overwrite").returncode == 0
    assert not list(out.rglob("*.tmp")) and verify_shards(out, decode=False) == []


def test_ctrl_c_while_workers_check_is_one_line(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the workers leave it to the parent,
    which ends them and says what it left, not one traceback per process."""
    src, out, errors = tmp_path / "src", tmp_path / "out", tmp_path / "stderr"
    for c in range(2):
        for i in range(3):
            write(src / f"c{c}" / f"{i}.png", encode(photo(c * 3 + i, (40, 30)), "PNG"))
    big = encode(Image.new("RGB", (8000, 8000), (120, 80, 40)), "PNG")  # 64 MP: a second or so to check each
    for i in range(12):  # the workers are at work when Ctrl-C comes
        write(src / "c1" / f"big{i}.png", big)
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([*MAKE_SHARDS, str(src), str(out), "--workers", "2"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 60
    while "checking" not in errors.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the pool's workers started, one in the read
    assert proc.poll() is None, errors.read_text()
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    err = errors.read_text()
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "make_shards: stopped by Ctrl-C: nothing was written", err
    assert list(out.iterdir()) == []  # the staging file removed
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b""  # no worker left


def test_verify_reports_what_is_wrong(digits_folder, tmp_path):
    out = tmp_path / "out"
    make_shards(src=digits_folder, out=out, max_count=600, progress=False)
    verify = [sys.executable, str(ROOT / "tools" / "verify_shards.py"), str(out)]
    clean = subprocess.run(verify, capture_output=True, text=True)
    assert clean.returncode == 0 and clean.stdout.strip() == f"{out}: OK"

    shard = out / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    entry = read_index(shard.with_suffix(".idx"))[5][1]  # the 6th sample's jpg
    data[entry.offset + 2 : entry.offset + 40] = bytes(38)  # wipe its JPEG headers
    shard.write_bytes(data)
    (out / "val" / "shard-000000.idx").write_text("v1.2 3\njpg 0 1 x.jpg\n")
    broken = subprocess.run(verify, capture_output=True, text=True)
    assert broken.returncode == 1
    lines = broken.stdout.strip().splitlines()
    assert f"{shard}: sha256 differs from the manifest (modified after sharding)" in lines
    assert any(line.startswith(f"{shard}: sample {entry.name.split('.')[0]}: does not decode") for line in lines)
    assert any("header says 3 samples, found 1" in line for line in lines)
    assert lines[-1] == f"{out}: {len(lines) - 1} problems"

    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    problems = verify_shards(out, decode=False)
    assert f"{shard}: {len(data) // 2} bytes, manifest says {len(data)}" in problems


@pytest.mark.parametrize("name,size", [("k.cls", 1), ("key-0123456789.jpg", 60_000), ("x" * 95 + ".jpg", 0),
                                       ("y" * 96 + ".jpg", 7), ("naïve-ü.jpg", 8**11 - 1), ("big.jpg", 8**11)])
def test_tar_header_is_byte_identical_to_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert tar_header(name, size) == info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def test_float_pixels_are_skipped_as_unsupported(tmp_path):
    src = tmp_path / "src"
    write_class(src / "ant", 0)
    write(src / "bee" / "0.jpg", encode(photo(30), "JPEG"))
    depth = Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), "F")
    write(src / "ant" / "depth.tif", encode(depth, "TIFF"))
    manifest = make_shards(src=src, out=tmp_path / "out", val_fraction=0, max_bad_fraction=0.1, progress=False)
    assert manifest["skipped"] == [{"path": "ant/depth.tif", "reason": "unsupported_mode", "detail": "pixel mode F"}]
    assert manifest["splits"]["train"]["samples"] == len(VALID_KINDS) + 1


@pytest.mark.parametrize("val_name", ["val", "validation", "valid", "dev", "Validation"])
def test_split_folder_names_of_hf_imagefolder_and_timm_are_splits(tmp_path, val_name):
    src, out = tmp_path / "src", tmp_path / "out"
    sizes = {"train": 4, val_name: 2, "test": 3}
    for split, n in sizes.items():
        for c, name in enumerate(["cat", "dog"]):
            for i in range(n):
                write(src / split / name / f"{i}.jpg", encode(photo(10 * c + i + 3 * n, (40, 30)), "JPEG", quality=90))
    write(src / "README.txt", b"top-level file")
    write(src / "cover.jpg", encode(photo(99, (40, 30)), "JPEG", quality=90))
    result = run_tool(src, out, "--workers", "1", "--max-bad-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]  # not ["test", "train", "validation"]
    assert {s: manifest["splits"][s]["per_class"] for s in ("train", "val", "test")} == {
        "train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 3, "dog": 3}}
    assert manifest["skipped"] == [{"path": "cover.jpg", "reason": "outside_class", "detail": "not inside a class folder"}]
    assert manifest["ignored"] == ["README.txt"]
    assert "test: 6 samples in 1 shard(s)" in result.stdout
    test_keys = set(shard_members(out, "test"))
    assert test_keys == {sample_key(f"test/{c}/{i}.jpg") for c in ("cat", "dog") for i in range(3)}
    assert verify_shards(out, workers=1) == []
    from pipelines.loader import create_loader
    from pipelines.spec import spec_from_processor
    from transformers import ViTImageProcessorPil

    loader = create_loader(data=out, split="test", spec=spec_from_processor(ViTImageProcessorPil(size={"height": 8, "width": 8})),
                           batch_size=4, train=False, device="cpu")
    assert {k for b in loader for k, m in zip(b["keys"], b["mask"]) if m} == test_keys


@pytest.mark.parametrize("folders, message", [
    (["train", "eval"], "has split folders (train) and eval, which is no split this tool knows"),
    (["train", "val", "cat"], "has split folders (train, val) and cat, which is no split this tool knows"),
    (["training", "testing"], "has split folders (none known) and testing, training"),
    (["train", "val", "validation"], "val/ and validation/ are both the val split"),
    (["val", "test"], "has split folders (test, val) but no train/"),
])
def test_unknown_split_folders_are_refused_by_name(tmp_path, folders, message):
    src = tmp_path / "src"
    for split in folders:
        write(src / split / "cat" / "0.jpg", encode(photo(0, (40, 30)), "JPEG", quality=90))
    result = run_tool(src, tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_class_name_is_one_class_in_either_unicode_form(tmp_path):
    """A Mac writes file names decomposed (NFD): a val folder copied from one, or a label list typed
    elsewhere, spells the class in other code points. Each is the one class, named composed (NFC);
    two folders of one split that differ only so are refused by name, not made two classes."""
    composed, decomposed = "Caf\u00e9 cr\u00e8me", "Cafe\u0301 cre\u0300me"
    src = tmp_path / "src"
    for split, name, first in [("train", composed, 0), ("train", "tea", 10), ("val", decomposed, 20), ("val", "tea", 30)]:
        for i in range(2):
            write(src / split / name / f"{i}.jpg", encode(photo(first + i, (40, 30)), "JPEG", quality=90))
    (tmp_path / "classes.txt").write_text(f"tea\n{decomposed}\n")
    result = run_tool(src, tmp_path / "out", "--classes", tmp_path / "classes.txt")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["tea", composed]
    manifest = load_manifest(tmp_path / "out")
    assert manifest["splits"]["val"]["per_class"] == {"tea": 2, composed: 2}
    assert manifest["splits"]["train"]["per_class"] == {"tea": 2, composed: 2}

    write(src / "train" / decomposed / "9.jpg", encode(photo(9, (40, 30)), "JPEG", quality=90))
    result = run_tool(src, tmp_path / "again")
    assert result.returncode == 2 and f"are the class {composed!r} in two Unicode forms" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "again").exists()


def test_val_split_is_drawn_from_the_valid_images_whatever_the_workers(tmp_path):
    """12 valid images per class, and 5 bad ones in `bee` and one in `ant`: --val-fraction 0.25 gives
    3 val images in each class, the same ones for 1 and 2 workers."""
    src = tmp_path / "src"
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(12):
            write(src / name / f"{i:02d}.jpg", encode(photo(20 * c + i, (40, 30)), "JPEG", quality=90))
    write_bad_files(src / "bee")
    write(src / "ant" / "00a_broken.jpg", b"\xff\xd8 not really")
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert run_tool(src, out, "--val-fraction", "0.25", "--min-side", "8", "--max-bad-fraction", "0.5",
                        "--workers", workers).returncode == 0
        runs.append(out)
    manifest = load_manifest(runs[0])
    assert manifest["splits"]["val"]["per_class"] == {"ant": 3, "bee": 3, "cow": 3}
    assert manifest["splits"]["train"]["per_class"] == {"ant": 9, "bee": 9, "cow": 9}
    assert manifest["skipped_counts"] == {"empty": 1, "too_small": 1, "truncated": 1, "undecodable": 2,
                                          "unsupported_format": 1}
    assert manifest == load_manifest(runs[1])
    for split in ("train", "val"):
        for a in sorted((runs[0] / split).iterdir()):
            assert a.read_bytes() == (runs[1] / split / a.name).read_bytes(), a.name
    assert not list(runs[0].glob(".*"))  # the staging file is gone


def test_a_full_disk_is_one_message_naming_the_output(tmp_path):
    from conftest import small_filesystem

    src = tmp_path / "src"
    for c in range(2):
        for i in range(30):
            write(src / f"c{c}" / f"{i}.png", encode(photo(c * 30 + i, (160, 120)), "PNG"))
    with small_filesystem(tmp_path / "small", "300k") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here")
        result = run_tool(src, small / "out", "--workers", "1")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "No space left on device" in result.stderr and f"while writing {small / 'out'}" in result.stderr
        assert "rerun with --overwrite" in result.stderr
        assert not (small / "out" / "manifest.json").exists() and not (small / "out" / ".staged.tmp").exists()


def test_byte_identical_copies_never_reach_val_beside_train(tmp_path):
    """Copies of one image (4 in `ant`, one filed under `bee` too) split here, with five seeds: every
    copy goes where the others go, the one under two classes goes to train, and no val JPEG equals a
    train JPEG byte for byte (val accuracy would count images the model trained on). Splits given
    as folders are kept, and their copies across splits are reported."""
    src = tmp_path / "src"
    for c, name in enumerate(["ant", "bee"]):
        for i in range(10):
            write(src / name / f"{i:02d}.jpg", encode(photo(20 * c + i, (40, 30)), "JPEG", quality=90))
    for copy in ("copy1.jpg", "deeper/copy2.jpg", "copy3"):
        write(src / "ant" / copy, (src / "ant" / "00.jpg").read_bytes())
    write(src / "bee" / "same_as_ant_05.jpg", (src / "ant" / "05.jpg").read_bytes())
    for seed in range(5):
        out = tmp_path / f"out{seed}"
        manifest = make_shards(src=src, out=out, val_fraction=0.5, seed=seed, workers=1, progress=False)
        train, val = ({m["jpg"] for m in shard_members(out, split).values()} for split in ("train", "val"))
        assert val and not val & train, seed
        assert (src / "ant" / "05.jpg").read_bytes() in train
        # ant: 9 images that can go either way (4 copies count as one), bee: 10; round(n / 2) of them in val
        per_class = manifest["splits"]["val"]["per_class"]
        assert per_class["bee"] == 5 and per_class["ant"] in (5, 8), (seed, per_class)
        assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 24
        assert manifest["duplicates"] == {
            "copies": 4, "split_here": True,
            "across_classes": {"count": 1, "groups": [["ant/05.jpg", "bee/same_as_ant_05.jpg"]]},
            "across_splits": {"count": 0, "inputs": []}}

    given = tmp_path / "given"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            write(given / split / "ant" / f"{i}.jpg", encode(photo(i + 10 * (split == "val"), (40, 30)), "JPEG"))
    write(given / "train" / "bee" / "0.jpg", encode(photo(20, (40, 30)), "JPEG"))
    write(given / "val" / "ant" / "leak.jpg", (given / "train" / "ant" / "2.jpg").read_bytes())
    result = run_tool(given, tmp_path / "given_out", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert load_manifest(tmp_path / "given_out")["duplicates"]["across_splits"] == {
        "count": 1, "inputs": [{"path": "val/ant/leak.jpg", "split": "val", "train": "train/ant/2.jpg"}]}
    assert ("warning: 1 val images are byte-identical to train images, so evals count images the model "
            "trained on; manifest: duplicates.across_splits") in result.stdout


def test_symlinked_folders_are_followed_each_once(tmp_path):
    """A class folder may link to images elsewhere (followed); a link back up its own tree is not
    followed: os.walk would follow a loop to the kernel's link limit (40 copies of each image), and
    a link to SRC would file every class's images under this one."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for i in range(3):
        write(src / "ant" / "sub" / f"{i}.jpg", encode(photo(i, (40, 30)), "JPEG", quality=90))
        write(elsewhere / f"{i}.jpg", encode(photo(10 + i, (40, 30)), "JPEG", quality=90))
    (src / "ant" / "sub" / "loop").symlink_to("..")
    (src / "ant" / "sub" / "up").symlink_to("../..")  # to SRC: would file bee's images under ant
    (src / "bee").symlink_to(elsewhere)
    manifest = make_shards(src=src, out=tmp_path / "out", val_fraction=0, workers=1, progress=False)
    assert manifest["splits"]["train"]["per_class"] == {"ant": 3, "bee": 3}
    assert manifest["duplicates"]["copies"] == 0


def test_what_is_no_file_under_an_image_name_is_skipped_at_once(tmp_path):
    """A named pipe or a device under an image's name (a link to /dev/zero, a pipe left by a
    capture tool) would block the run forever or read without end; a broken link cannot be read:
    each is skipped, counted and named, and the run goes on."""
    src = tmp_path / "src"
    for i in range(4):
        write(src / "ant" / f"{i}.jpg", encode(photo(i, (40, 30)), "JPEG", quality=90))
        write(src / "bee" / f"{i}.jpg", encode(photo(10 + i, (40, 30)), "JPEG", quality=90))
    os.mkfifo(src / "ant" / "stream.jpg")
    os.mkfifo(src / "bee" / "pipe")  # no extension: its first bytes are asked for, without waiting
    (src / "ant" / "zero.jpg").symlink_to("/dev/zero")
    (src / "bee" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    result = run_tool(src, tmp_path / "out", "--val-fraction", "0", "--max-bad-fraction", "0.5", "--workers", "1",
                      timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["per_class"] == {"ant": 4, "bee": 4}
    assert manifest["skipped_counts"] == {"not_a_file": 3, "unreadable": 1}
    reasons = {s["path"]: (s["reason"], s["detail"]) for s in manifest["skipped"]}
    assert reasons["ant/stream.jpg"] == ("not_a_file", f"{src / 'ant' / 'stream.jpg'} is a named pipe, not a file")
    assert reasons["ant/zero.jpg"] == ("not_a_file", f"{src / 'ant' / 'zero.jpg'} is a device, not a file")
    assert reasons["bee/pipe"][0] == "not_a_file" and reasons["bee/gone.jpg"][0] == "unreadable"
    assert "No such file or directory" in reasons["bee/gone.jpg"][1]
