"""tools/make_shards.py on Hugging Face datasets built here from real photos with `datasets` (no
network): saved with save_to_disk and as the hub's Parquet files, both streamed row by row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, encode, photo, read_with_dali
from test_make_shards import shard_members
from pipelines.shards import ShardFormatError, load_manifest

datasets = pytest.importorskip("datasets")

MAKE_SHARDS = [sys.executable, str(ROOT / "tools" / "make_shards.py")]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# ClassLabel order, not alphabetical: the ids must follow it
NAMES = ["healthy", "bean_rust", "angular_leaf_spot"]
SIZES = {"train": 26, "validation": 8, "test": 6}
# rows of the train split that are not good images, and why make_shards must skip them
BAD_ROWS = {3: "undecodable", 7: "truncated", 11: "unlabeled", 15: "empty"}


def image_bytes(n: int, split: str) -> bytes:
    """Real photos, clean JPEG (copied as is) or PNG (converted), of varying sizes."""
    img = photo(n + {"train": 0, "validation": 100, "test": 200}[split], (64 + 4 * (n % 5), 48 + 6 * (n % 3)))
    return encode(img, "JPEG", quality=90) if n % 3 else encode(img, "PNG")


def build(split: str, n: int) -> dict:
    rows = {"image": [], "labels": [], "note": []}
    for i in range(n):
        data, label = image_bytes(i, split), i % len(NAMES)
        if split == "train" and i in BAD_ROWS:
            data = {"undecodable": b"\x89PNG not really", "truncated": data[: len(data) // 2], "empty": b""}.get(
                BAD_ROWS[i], data)
            label = -1 if BAD_ROWS[i] == "unlabeled" else label
        rows["image"].append({"bytes": data, "path": None})
        rows["labels"].append(label)
        rows["note"].append(f"row {i}")
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=NAMES),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def beans(tmp_path_factory) -> dict[str, Path]:
    """A beans-like DatasetDict, saved both ways."""
    root = tmp_path_factory.mktemp("hf")
    dd = datasets.DatasetDict({split: build(split, n) for split, n in SIZES.items()})
    dd.save_to_disk(str(root / "saved"))
    for split, ds in dd.items():  # the hub's layout: data/<split>-00000-of-00001.parquet
        ds.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    return {"saved": root / "saved", "parquet": root / "parquet", "dict": dd}


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE_SHARDS, *map(str, args)], capture_output=True, text=True, env=OFFLINE)


def test_saved_and_parquet_datasets_shard_alike_with_their_splits_labels_and_skips(beans, tmp_path):
    outs = {}
    for kind in ("saved", "parquet"):
        outs[kind] = tmp_path / kind
        result = run_tool(beans[kind], outs[kind], "--max-count", "7", "--workers", "2", "--val-fraction", "0.5")
        assert result.returncode == 1, result.stderr  # 4 of 40 skipped is over the default 1%
        assert "4 of 40 inputs skipped" in result.stderr and "Traceback" not in result.stderr
        assert "train: 22 samples in 4 shard(s)" in result.stdout and "test: 6 samples" in result.stdout

    manifest = json.loads((outs["saved"] / "manifest.json").read_text())
    assert json.loads((outs["saved"] / "classes.json").read_text()) == NAMES
    assert manifest["layout"] == "hf_dataset"
    assert manifest["hf"] == {"kind": "save_to_disk", "image_column": "image", "label_column": "labels",
                              "splits": {"train": "train", "val": "validation", "test": "test"}}
    # the dataset's own validation split, whole: --val-fraction does not apply
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val", "test")} == {"train": 22, "val": 8, "test": 6}
    assert {(s["path"], s["reason"]) for s in manifest["skipped"]} == {
        (f"train/{i:08d}", reason) for i, reason in BAD_ROWS.items()}
    assert manifest["inputs"] == 40
    pngs = sum(1 for split, n in SIZES.items() for i in range(n) if i % 3 == 0 and not (split == "train" and i in BAD_ROWS))
    assert manifest["converted_counts"] == {"format_png": pngs}

    # content: every valid row is in its split with its ClassLabel id; clean JPEGs byte for byte
    for split, ours in (("train", "train"), ("validation", "val"), ("test", "test")):
        members = shard_members(outs["saved"], ours)
        expected = {}
        for i, row in enumerate(beans["dict"][split].cast_column("image", datasets.Image(decode=False))):
            if split == "train" and i in BAD_ROWS:
                continue
            expected[f"{split}/{i:08d}"] = row
        from pipelines.shards import sample_key

        assert set(members) == {sample_key(name) for name in expected}
        for name, row in expected.items():
            sample = members[sample_key(name)]
            assert int(sample["cls"]) == row["labels"]
            if row["image"]["bytes"][:2] == b"\xff\xd8":
                assert sample["jpg"] == row["image"]["bytes"]
        rows = read_with_dali(outs["saved"] / ours)  # DALI reads and decodes every sample
        assert Counter(label for _, label, _ in rows) == Counter(r["labels"] for r in expected.values())

    # the Parquet files give byte-identical shards
    parquet = json.loads((outs["parquet"] / "manifest.json").read_text())
    assert parquet["hf"]["kind"] == "parquet" and parquet["splits"] == manifest["splits"]
    for split in ("train", "val", "test"):
        for shard in sorted((outs["saved"] / split).iterdir()):
            assert shard.read_bytes() == (outs["parquet"] / split / shard.name).read_bytes(), shard


def test_one_split_with_string_labels_is_split_here(beans, tmp_path):
    """A glob of Parquet files naming no split, with string labels in columns named by hand: one
    train split, val drawn per class with --val-fraction, classes sorted; a label spelt composed in
    some rows and decomposed (NFD, as a Mac writes) in others is one class."""
    names = ["zebra", "cat", "caf\u00e9"]
    ds = datasets.Dataset.from_dict({
        "picture": [{"bytes": image_bytes(i, "train"), "path": None} for i in range(30)],
        "kind": [names[i % 3] if i % 2 else unicodedata.normalize("NFD", names[i % 3]) for i in range(30)],
        "other_image": [{"bytes": image_bytes(i + 1, "test"), "path": None} for i in range(30)],
    }, features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string"),
                                   "other_image": datasets.Image()}))
    ds.select(range(0, 15)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    ds.select(range(15, 30)).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))

    refused = run_tool(tmp_path / "pq" / "*.parquet", tmp_path / "refused")
    assert refused.returncode == 2
    assert "2 columns are an Image feature" in refused.stderr and "--image-column" in refused.stderr

    out = tmp_path / "out"
    result = run_tool(tmp_path / "pq" / "*.parquet", out, "--image-column", "picture", "--label-column", "kind",
                      "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == ["caf\u00e9", "cat", "zebra"]
    assert manifest["splits"]["val"]["per_class"] == {"caf\u00e9": 2, "cat": 2, "zebra": 2}
    assert manifest["splits"]["train"]["per_class"] == {"caf\u00e9": 8, "cat": 8, "zebra": 8}
    members = {**shard_members(out, "train"), **shard_members(out, "val")}
    from pipelines.shards import sample_key

    for i in range(30):
        sample = members[sample_key(f"train/{i:08d}")]
        assert ["caf\u00e9", "cat", "zebra"][int(sample["cls"])] == names[i % 3]
        if i % 3:  # clean JPEG: the picture column's bytes, not other_image's
            assert sample["jpg"] == image_bytes(i, "train")

    # rows of one label alone would train a classifier of one class: the manifest records why, exit 1
    ds.select(range(0, 30, 3)).to_parquet(str(tmp_path / "zebras" / "train-00000-of-00001.parquet"))
    zebras = run_tool(tmp_path / "zebras", tmp_path / "zebra_shards", "--image-column", "picture",
                      "--label-column", "kind")
    assert zebras.returncode == 1 and "Traceback" not in zebras.stderr
    assert ("make_shards: error: one class alone, 'zebra', has valid train images: a classifier needs two classes "
            "or more") in zebras.stderr
    with pytest.raises(ShardFormatError, match="one class alone"):
        load_manifest(tmp_path / "zebra_shards")


def test_splits_it_does_not_know_are_refused_or_mapped(beans, tmp_path):
    dd = datasets.DatasetDict({"train": build("train", 20), "extra": build("validation", 5)})
    dd.save_to_disk(str(tmp_path / "src"))
    refused = run_tool(tmp_path / "src", tmp_path / "out")
    assert refused.returncode == 2
    assert "extra is no split this tool knows" in refused.stderr and "--splits" in refused.stderr
    mapped = run_tool(tmp_path / "src", tmp_path / "out", "--splits", "train=train,val=extra",
                      "--max-bad-fraction", "0.5")
    assert mapped.returncode == 0, mapped.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 5 and manifest["hf"]["splits"] == {"train": "train", "val": "extra"}
    bad = run_tool(tmp_path / "src", tmp_path / "out2", "--splits", "train=train,val=nope")
    assert bad.returncode == 2 and "--splits names nope" in bad.stderr


def test_unreachable_hub_and_missing_library_are_one_line_errors(tmp_path):
    offline = run_tool("hf:user/some-dataset:config", tmp_path / "out")
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.startswith("make_shards: error: hf:user/some-dataset:config: cannot load the dataset from "
                                     "the Hugging Face hub")
    script = (f"import sys; sys.modules['datasets'] = None; sys.path.insert(0, {str(ROOT / 'tools')!r}); "
              f"import make_shards; sys.exit(make_shards.main(['hf:beans', {str(tmp_path / 'out')!r}]))")
    missing = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ('make_shards: error: reading Hugging Face datasets needs the `datasets` '
                                      'library: pip install -e ".[datasets]"')


def test_rows_go_to_the_workers_in_bounded_chunks_and_keep_their_order(beans, tmp_path, monkeypatch):
    import make_shards as tool

    whole = tool.make_shards(src=str(beans["saved"]), out=tmp_path / "whole", max_bad_fraction=0.5, progress=False)
    sizes = []
    chunks = tool._chunks

    def recorded(inputs):
        for chunk in chunks(inputs):
            sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(tool, "CHUNK_BYTES", 20_000)  # a few photos per chunk
    monkeypatch.setattr(tool, "_chunks", recorded)
    chunked = tool.make_shards(src=str(beans["saved"]), out=tmp_path / "chunked", max_bad_fraction=0.5, progress=False)
    assert len(sizes) > 5 and sum(sizes) == 39 and max(sizes) < 10  # 40 rows, one unlabeled never sent
    assert chunked["splits"] == whole["splits"]


def test_a_damaged_parquet_file_is_named(beans, tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    good = (beans["parquet"] / "data" / "train-00000-of-00001.parquet").read_bytes()
    (src / "train-00000.parquet").write_bytes(good)
    (src / "validation-00000.parquet").write_bytes(good[: len(good) // 2])  # cut short: no footer
    result = run_tool(src, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{src / 'validation-00000.parquet'}: not a readable Parquet file" in result.stderr


def test_a_stream_without_declared_features_takes_the_columns_named(monkeypatch):
    """Some hub datasets stream without column types (features None): the columns must be named,
    and then the rows are read as they come."""
    from pipelines import hf_source

    def rows():
        for i in range(4):
            yield {"img": {"bytes": image_bytes(i, "train"), "path": None}, "y": ["cat", "dog"][i % 2]}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.features is None
    monkeypatch.setattr(hf_source, "_load", lambda datasets, src: ("hub", {"train": stream}))
    with pytest.raises(hf_source.HFSourceError, match="does not declare its features"):
        hf_source.open_source("hf:x")
    source = hf_source.open_source("hf:x", image_column="img", label_column="y")
    got = list(source.rows())
    assert [(split, name, label) for split, name, _, label in got] == [
        (None, f"train/{i:08d}", ["cat", "dog"][i % 2]) for i in range(4)]
    assert [image for _, _, image, _ in got] == [image_bytes(i, "train") for i in range(4)]
