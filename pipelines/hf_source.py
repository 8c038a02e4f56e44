"""Hugging Face datasets as a source of tools/make_shards.py: a folder written by `save_to_disk`,
Parquet files as the hub stores them (a folder or a glob), or a hub name `hf:NAME[:CONFIG]`.

Rows are streamed (never a whole dataset in memory): `Dataset.to_iterable_dataset` for a saved
dataset, pyarrow's batch reader for Parquet files (`ParquetRows`), `load_dataset(..., streaming=True)`
for the hub, the image column cast to `Image(decode=False)` where the library reads it, so the
encoded bytes arrive as stored and make_shards checks and converts them like any file. Needs the optional `datasets` library (`pip install -e ".[datasets]"`).
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipelines.shards import SPLIT_ALIASES, class_name

LABEL_NAMES = ("label", "labels")  # the label column when no ClassLabel feature says which
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its folder
# how the hub names Parquet files: data/train-00000-of-00002.parquet, validation/0000.parquet, ...
SPLIT_IN_NAME = re.compile(rf"^({'|'.join(sorted(SPLIT_ALIASES, key=len, reverse=True))})(?=[-_.]|$)", re.IGNORECASE)


class HFSourceError(ValueError):
    """The dataset cannot be used as given; the message names it and says what to pass."""


@dataclass
class HFSource:
    """One dataset, its splits mapped to ours and its columns chosen."""

    description: str  # hf:NAME[:CONFIG], the folder or the glob
    kind: str  # save_to_disk | parquet | hub
    splits: dict[str | None, object]  # our split, or None (split here with --val-fraction): a streamed dataset
    split_names: dict[str, str]  # our split -> the dataset's split name
    image_column: str
    label_column: str
    classes: list[str] | None  # the ClassLabel's names; None for plain integer or string labels
    rows_per_split: dict[str | None, int | None] = field(default_factory=dict)

    @property
    def total(self) -> int | None:
        counts = list(self.rows_per_split.values())
        return None if None in counts or not counts else sum(counts)

    def rows(self) -> Iterator[tuple[str | None, str, bytes | str | None, str | None]]:
        """(our split or None, a name for the row: "<dataset split>/<row index>", the encoded image
        (bytes, or the path of a local file) or None, the label's class name or None when the row
        has no label), in the dataset's order."""
        for split, dataset in self.splits.items():
            name = self.split_names[split or "train"]
            rows, index = iter(dataset), 0
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except Exception as e:  # a damaged file, a dropped connection: name where it stopped
                    raise HFSourceError(f"{self.description}: reading split {name} failed at row {index} "
                                        f"({type(e).__name__}: {e})") from None
                yield split, f"{name}/{index:08d}", _payload(row[self.image_column]), self._label(row[self.label_column])
                index += 1

    def _label(self, value) -> str | None:
        if value is None or (self.classes is not None and value == -1):  # ClassLabel's "no label"
            return None
        if self.classes is not None:
            return self.classes[value]
        return class_name(str(value))

    def manifest(self) -> dict:
        return {"kind": self.kind, "image_column": self.image_column, "label_column": self.label_column,
                "splits": dict(self.split_names)}


def is_hf_source(src: str) -> bool:
    """hf:NAME, a glob, a Parquet file, or a folder that save_to_disk wrote or that holds Parquet files
    at its top or under data/ (the hub's layout)."""
    if src.startswith("hf:") or glob.has_magic(src) or src.endswith(".parquet"):
        return True
    path = Path(src)
    if not path.is_dir():
        return False
    return (any((path / marker).is_file() for marker in SAVED_MARKERS)
            or any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")))


def open_source(src: str, *, image_column: str | None = None, label_column: str | None = None,
                splits: dict[str, str] | None = None) -> HFSource:
    """The dataset at `src`, ready to stream; HFSourceError for anything that keeps it from being
    sharded, before any row is read. `splits` maps our split names to the dataset's
    (train/val/test -> name); by default train, validation|valid|val|dev and test are taken and any
    other split is an error."""
    datasets = _import_datasets()
    kind, loaded = _load(datasets, src)
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = {"train": loaded}  # one split: val is drawn from it
    ours = _map_splits(src, list(loaded.keys()), splits)
    features = next(iter(loaded.values())).features
    if features is None:  # some hub datasets stream without declared column types: the user names them
        if not (image_column and label_column):
            raise HFSourceError(f"{src}: the dataset does not declare its features (column types); name the "
                                f"columns with --image-column and --label-column")
        image, label, classes = image_column, label_column, None
    else:
        image = _image_column(src, features, image_column)
        label = _label_column(src, features, label_column)
        classes = ([class_name(name) for name in features[label].names]
                   if isinstance(features[label], datasets.ClassLabel) else None)
        if classes is None and not _is_value(features[label], ("int", "uint", "string", "large_string")):
            raise HFSourceError(f"{src}: label column {label!r} is {features[label]}; it must be a ClassLabel, an "
                                f"integer or a string")
    streams: dict[str | None, object] = {}
    counts: dict[str | None, int | None] = {}
    to_split_here = "val" not in ours
    for our, name in ours.items():
        dataset = loaded[name].select_columns([image, label])
        counts_known = getattr(dataset, "num_rows", None)  # Dataset's; ParquetRows' from the file footers
        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.to_iterable_dataset()  # memory-mapped rows, read one by one
        if not isinstance(dataset, ParquetRows) and features is not None:  # without features: raw values
            dataset = dataset.cast_column(image, datasets.Image(decode=False))
        key = None if our == "train" and to_split_here else our
        streams[key] = dataset
        counts[key] = counts_known if counts_known is not None else _declared_rows(loaded[name], name)
    return HFSource(description=src, kind=kind, splits=streams, split_names=ours, image_column=image,
                    label_column=label, classes=classes, rows_per_split=counts)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise HFSourceError('reading Hugging Face datasets needs the `datasets` library: pip install -e ".[datasets]"'
                            ) from None
    datasets.disable_progress_bars()  # make_shards shows its own
    datasets.logging.set_verbosity_error()
    return datasets


def _load(datasets, src: str):
    """(kind, a Dataset / IterableDataset / ParquetRows, or a dict of them by split name)."""
    try:
        if src.startswith("hf:"):
            name, _, config = src[3:].partition(":")
            if not name:
                raise HFSourceError("hf: needs a dataset name, as in hf:beans or hf:user/name:config")
            return "hub", datasets.load_dataset(name, config or None, streaming=True)
        path = Path(src)
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
            return "save_to_disk", datasets.load_from_disk(str(path))
        return "parquet", {name: ParquetRows(paths, datasets.Features.from_arrow_schema(_schema(paths[0])))
                           for name, paths in _parquet_files(src).items()}
    except HFSourceError:
        raise
    except Exception as e:  # the library raises FileNotFoundError, ConnectionError, DatasetNotFoundError, ...
        where = "from the Hugging Face hub (is it reachable from here, and the name right?)" if src.startswith("hf:") else ""
        raise HFSourceError(f"{src}: cannot load the dataset {where}: {type(e).__name__}: {e}".replace("  ", " ")) from None


def _parquet_files(src: str) -> dict[str, list[str]]:
    """{dataset split: [files]} of a folder (its *.parquet, or data/*.parquet), a glob or one file:
    the split is the file name's first word (train-00000-of-00002.parquet) or its folder's name; a
    set of files naming no split is one train split."""
    path = Path(src)
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))
    else:
        files = sorted(Path(f) for f in glob.glob(src, recursive=True) if f.endswith(".parquet"))
    if not files:
        raise HFSourceError(f"{src}: no Parquet files " + ("in this folder or its data/" if path.is_dir() else "match"))
    by_split: dict[str, list[str]] = {}
    unnamed = []
    for f in files:
        match = SPLIT_IN_NAME.match(f.name) or SPLIT_IN_NAME.match(f.parent.name)
        if match:
            by_split.setdefault(match.group(1).lower(), []).append(str(f))
        else:
            unnamed.append(f)
    if by_split and unnamed:
        raise HFSourceError(f"{src}: {len(unnamed)} Parquet file(s) ({unnamed[0].name}, ...) name no split while "
                            f"others do ({', '.join(sorted(by_split))}); name every file after its split "
                            f"(train-00000.parquet) or shard one split at a time")
    return by_split or {"train": [str(f) for f in unnamed]}


class ParquetRows:
    """The rows of Parquet files, a small batch at a time, as plain values (an Image cell is its
    {"bytes", "path"} struct). Read with pyarrow's synchronous reader: `load_dataset("parquet",
    streaming=True)` reads ahead of a slow consumer without bound (measured: 950 MB of Parquet in
    100-row groups went through make_shards with 1.37 GB resident against 0.31 GB this way)."""

    BATCH = 64

    def __init__(self, paths: list[str], features, columns: list[str] | None = None):
        self.paths, self.features, self.columns = paths, features, columns

    def select_columns(self, columns: list[str]) -> "ParquetRows":
        return ParquetRows(self.paths, self.features, columns)

    @property
    def num_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(path).metadata.num_rows for path in self.paths)

    def __iter__(self):
        import pyarrow.parquet as pq

        for path in self.paths:
            with pq.ParquetFile(path, pre_buffer=False) as f:
                for batch in f.iter_batches(batch_size=self.BATCH, columns=self.columns, use_threads=False):
                    yield from batch.to_pylist()


def _schema(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise HFSourceError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _map_splits(src: str, names: list[str], given: dict[str, str] | None) -> dict[str, str]:
    """{our split: the dataset's split name}."""
    if given:
        if missing := [name for name in given.values() if name not in names]:
            raise HFSourceError(f"{src}: --splits names {', '.join(missing)}, which the dataset does not have "
                                f"(it has {', '.join(names)})")
        if "train" not in given:
            raise HFSourceError(f"--splits must name the train split (train=NAME); the dataset has {', '.join(names)}")
        return dict(given)
    ours: dict[str, str] = {}
    unknown = []
    for name in names:
        split = SPLIT_ALIASES.get(name.lower())
        if split is None:
            unknown.append(name)
        elif split in ours:
            raise HFSourceError(f"{src}: splits {ours[split]} and {name} are both the {split} split; choose with "
                                f"--splits train=NAME,val=NAME,test=NAME")
        else:
            ours[split] = name
    if unknown or "train" not in ours:
        has = ", ".join(names)
        raise HFSourceError(f"{src} has splits {has}: " + (f"{', '.join(unknown)} is no split this tool knows"
                            if unknown else "none is a train split") + "; choose with --splits "
                            "train=NAME[,val=NAME][,test=NAME] (splits not named are left out)")
    return {split: ours[split] for split in ("train", "val", "test") if split in ours}


def _image_column(src: str, features, given: str | None) -> str:
    import datasets

    if given:
        if given not in features:
            raise HFSourceError(f"{src}: --image-column {given!r} is not a column ({_columns(features)})")
        if not isinstance(features[given], datasets.Image) and not _is_value(features[given], ("binary", "large_binary", "string", "large_string")):
            raise HFSourceError(f"{src}: --image-column {given!r} is {features[given]}; it must be an Image, "
                                f"encoded bytes or a file path")
        return given
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        raise HFSourceError(f"{src}: " + ("no column is" if not images else f"{len(images)} columns are")
                            + f" an Image feature ({_columns(features)}); name one with --image-column")
    return images[0]


def _label_column(src: str, features, given: str | None) -> str:
    import datasets

    if given:
        if given not in features:
            raise HFSourceError(f"{src}: --label-column {given!r} is not a column ({_columns(features)})")
        return given
    class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    if not class_labels and (named := [name for name in LABEL_NAMES if name in features]):
        return named[0]
    raise HFSourceError(f"{src}: " + (f"{len(class_labels)} columns are ClassLabel features" if class_labels else
                        "no column is a ClassLabel feature or named label") + f" ({_columns(features)}); name one "
                        f"with --label-column")


def _is_value(feature, dtypes: tuple[str, ...]) -> bool:
    dtype = getattr(feature, "dtype", None)
    return type(feature).__name__ == "Value" and isinstance(dtype, str) and dtype.startswith(dtypes)


def _columns(features) -> str:
    return ", ".join(f"{name}: {type(feature).__name__}" for name, feature in features.items())


def _declared_rows(dataset, name: str) -> int | None:
    info = getattr(dataset, "info", None)
    split = (info.splits or {}).get(name) if info is not None else None
    return getattr(split, "num_examples", None) or None


def _payload(value) -> bytes | str | None:
    """The encoded image of an `Image(decode=False)` cell: its bytes, else the path of its file."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return value.get("path") or None  # a file that cannot be read is skipped as unreadable, named
    return value or None
