"""Where a model is wrong: the files `--eval_only` writes, and a training run at its final eval.

    eval_results.json   loss, top-1, top-5, samples; per-class accuracy; the most confused pairs
    predictions.jsonl   one line per sample: key, true label, top-5 labels with probabilities
    confusion_matrix.png  rows true, columns predicted, shaded by the share of the row; all
                        classes up to 50, else the 30 with the most errors

Each rank writes its part of the predictions while it evaluates; rank 0 joins the parts in rank
order (each rank evaluates a contiguous part of the split, so the file is in the split's order)
and computes the rest from the joined file in one pass, whatever the number of classes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from train.checkpoint import WriteError, write_atomic, write_failure

RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
CONFUSION_FILE = "confusion_matrix.png"
TOP_K = 5
ALL_CLASSES_UP_TO = 50  # the picture shows every class up to this many, else the most confused
MOST_CONFUSED_CLASSES = 30
CONFUSED_PAIRS = 20  # pairs listed in eval_results.json


class PredictionWriter:
    """This rank's part of predictions.jsonl: the real (masked) samples of each eval batch."""

    def __init__(self, output_dir: Path, *, rank: int, classes: list[str]):
        self.classes = classes
        self.path = part_path(output_dir, rank)
        try:
            self.file = open(self.path, "w")
        except OSError as e:
            raise WriteError(f"writing {self.path} failed: {write_failure(e)}") from e

    def add(self, *, keys: list[str], labels: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
        probs, ids = logits.float().softmax(dim=1).topk(min(TOP_K, logits.shape[1]), dim=1)
        probs, ids, labels, mask = probs.cpu().tolist(), ids.cpu().tolist(), labels.cpu().tolist(), mask.cpu().tolist()
        lines = []
        for key, label, p, i, real in zip(keys, labels, probs, ids, mask):
            if real:
                top = [[self.classes[c], round(q, 6)] for c, q in zip(i, p)]
                lines.append(json.dumps({"key": key, "label": self.classes[label], "top5": top}) + "\n")
        try:
            self.file.writelines(lines)
        except OSError as e:
            raise WriteError(f"writing {self.path} failed: {write_failure(e)}") from e

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            raise WriteError(f"writing {self.path} failed: {write_failure(e)}") from e


def part_path(output_dir: Path, rank: int) -> Path:
    return output_dir / f".{PREDICTIONS_FILE}.rank{rank}.part"


def join_predictions(output_dir: Path, world_size: int) -> Path:
    """The ranks' parts, in rank order, into predictions.jsonl (replaced whole); the parts removed."""
    final = output_dir / PREDICTIONS_FILE
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            for rank in range(world_size):
                with open(part_path(output_dir, rank), "rb") as part:
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
        os.replace(tmp, final)
    except OSError as e:
        raise WriteError(f"writing {final} failed: {write_failure(e)}") from e
    for rank in range(world_size):
        part_path(output_dir, rank).unlink(missing_ok=True)
    return final


@dataclass
class Report:
    results: dict  # what eval_results.json holds
    pairs: Counter  # (true id, predicted id) -> samples, the diagonal included
    true_ids: list[int]
    predicted_ids: list[int]
    paths: dict[str, Path] = field(default_factory=dict)  # the files written (write_report)


def summarize(predictions: Path, *, classes: list[str], scalars: dict, context: dict) -> Report:
    """Per-class accuracy and the most confused pairs, from predictions.jsonl in one pass.
    `scalars` are the all-reduced eval/loss, eval/top1, eval/top5 and eval/samples_counted."""
    index = {name: i for i, name in enumerate(classes)}
    pairs: Counter = Counter()
    true_ids, predicted_ids = [], []
    with open(predictions) as f:
        for line in f:
            row = json.loads(line)
            t, p = index[row["label"]], index[row["top5"][0][0]]
            pairs[t, p] += 1
            true_ids.append(t)
            predicted_ids.append(p)
    samples, hits, predicted = Counter(), Counter(), Counter()
    for (t, p), n in pairs.items():
        samples[t] += n
        predicted[p] += n
        if t == p:
            hits[t] += n
    per_class = {name: {"samples": samples[i], "top1": hits[i] / samples[i] if samples[i] else None,
                        "predicted": predicted[i]} for i, name in enumerate(classes)}
    confused = sorted(((n, t, p) for (t, p), n in pairs.items() if t != p), key=lambda x: (-x[0], x[1], x[2]))
    most_confused = [{"true": classes[t], "predicted": classes[p], "count": n, "share_of_true": n / samples[t]}
                     for n, t, p in confused[:CONFUSED_PAIRS]]
    results = {**context, "loss": scalars["eval/loss"], "top1": scalars["eval/top1"], "top5": scalars["eval/top5"],
               "samples": int(scalars["eval/samples_counted"]), "per_class": per_class,
               "most_confused": most_confused}
    return Report(results=results, pairs=pairs, true_ids=true_ids, predicted_ids=predicted_ids)


def write_report(report: Report, output_dir: Path, *, classes: list[str]) -> dict[str, Path]:
    """eval_results.json and confusion_matrix.png; {name: path} of the three files."""
    paths = {"results": output_dir / RESULTS_FILE, "predictions": output_dir / PREDICTIONS_FILE,
             "confusion_matrix": output_dir / CONFUSION_FILE}
    results = {**report.results, "files": {name: path.name for name, path in paths.items()}}
    try:
        write_atomic(paths["results"], json.dumps(results, indent=1) + "\n")
        picture = confusion_picture(report.pairs, classes=classes)
        tmp = paths["confusion_matrix"].with_name(f".{CONFUSION_FILE}.tmp")
        picture.save(tmp, "PNG")
        os.replace(tmp, paths["confusion_matrix"])
    except OSError as e:
        raise WriteError(f"writing the eval results in {output_dir} failed: {write_failure(e)}") from e
    return paths


def shown_classes(pairs: Counter, num_classes: int) -> list[int]:
    """Every class up to ALL_CLASSES_UP_TO, else the MOST_CONFUSED_CLASSES with the most errors
    (their samples predicted as another class plus other samples predicted as them), in id order."""
    if num_classes <= ALL_CLASSES_UP_TO:
        return list(range(num_classes))
    errors = Counter()
    for (t, p), n in pairs.items():
        if t != p:
            errors[t] += n
            errors[p] += n
    chosen = sorted(errors, key=lambda c: (-errors[c], c))[:MOST_CONFUSED_CLASSES]
    return sorted(chosen)


def confusion_picture(pairs: Counter, *, classes: list[str]) -> Image.Image:
    """Rows are true classes, columns predicted ones; a cell's shade is its share of the row
    (of all the row's samples, also those predicted as classes not shown), with the count
    written where it fits."""
    shown = shown_classes(pairs, len(classes))
    k = max(len(shown), 1)
    cell = max(14, min(48, 900 // k))
    font = _font(max(9, min(14, cell - 4)))
    names = [_short(classes[c]) for c in shown]
    label_px = max([int(font.getlength(n)) for n in names] + [40]) + 8
    title_h, pad = 28, 10
    width = label_px + k * cell + pad * 2
    height = title_h + label_px + k * cell + pad * 2
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    rows = Counter()
    for (t, _), n in pairs.items():
        rows[t] += n
    title = "confusion matrix: rows true, columns predicted (shade: share of the row)"
    if len(shown) < len(classes):
        title = f"the {len(shown)} most confused of {len(classes)} classes: rows true, columns predicted"
    draw.text((pad, pad // 2), title, fill="black", font=font)
    x0, y0 = pad + label_px, title_h + label_px
    for j, name in enumerate(names):  # column labels, written upwards
        text = Image.new("L", (label_px, cell), 0)
        ImageDraw.Draw(text).text((4, (cell - font.size) // 2), name, fill=255, font=font)
        rotated = text.rotate(90, expand=True)
        img.paste((0, 0, 0), (x0 + j * cell, y0 - label_px), rotated)
    for i, (t, name) in enumerate(zip(shown, names)):
        y = y0 + i * cell
        draw.text((pad, y + (cell - font.size) // 2), name, fill="black", font=font)
        for j, p in enumerate(shown):
            n = pairs.get((t, p), 0)
            share = n / rows[t] if rows[t] else 0.0
            shade = _shade(share, correct=t == p)
            box = (x0 + j * cell, y, x0 + (j + 1) * cell - 1, y + cell - 1)
            draw.rectangle(box, fill=shade, outline=(220, 220, 220))
            if n and cell >= 18:
                text = str(n)
                if font.getlength(text) <= cell - 2:
                    color = "white" if share > 0.5 or (t != p and share > 0.25) else "black"
                    draw.text((box[0] + (cell - font.getlength(text)) / 2, y + (cell - font.size) / 2), text,
                              fill=color, font=font)
    return img


def _shade(share: float, *, correct: bool) -> tuple[int, int, int]:
    """White to dark blue on the diagonal, white to red off it; off the diagonal by the square root
    of the share, so that a few errors in a large class still show."""
    if correct:
        return int(255 - 208 * share), int(255 - 150 * share), int(255 - 60 * share)
    strength = min(1.0, math.sqrt(share))
    return int(255 - 40 * strength), int(255 - 200 * strength), int(255 - 200 * strength)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def describe(results: dict) -> list[str]:
    """A few lines for the terminal: the totals, the weakest classes and the most confused pairs."""
    lines = [f"{results['samples']} images: loss {results['loss']:.4f}, top-1 {results['top1']:.2%}, "
             f"top-5 {results['top5']:.2%}"]
    scored = [(v["top1"], name) for name, v in results["per_class"].items() if v["top1"] is not None]
    if len(scored) > 1:
        weakest = sorted(scored)[:3]
        lines.append("weakest classes: " + ", ".join(f"{name} {acc:.1%}" for acc, name in weakest))
    if results["most_confused"]:
        lines.append("most confused: " + ", ".join(f"{c['true']} -> {c['predicted']} ({c['count']})"
                                                   for c in results["most_confused"][:3]))
    return lines

