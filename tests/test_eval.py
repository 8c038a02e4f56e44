"""Where a model is wrong: `--eval_only` on any number of ranks, and the same files at a training
run's final eval (train/evaluation.py)."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter

import pytest
from PIL import Image

from conftest import ROOT, common, train
from test_train import wandb_history
from train.evaluation import ALL_CLASSES_UP_TO, MOST_CONFUSED_CLASSES, confusion_picture, shown_classes


def val_labels(data) -> dict[str, str]:
    """key -> class name of every val sample, read with tarfile."""
    classes = json.loads((data / "classes.json").read_text())
    labels = {}
    for shard in sorted((data / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    labels[key] = classes[int(tar.extractfile(member).read())]
    return labels


def predictions(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]


def test_eval_only_on_three_ranks_matches_the_training_runs_final_eval(files, tmp_path):
    run, config = tmp_path / "run", tmp_path / "fixed.json"
    # a config that fixes the batch for 2 ranks and the learning rate: the eval, on 3, reads its micro batch alone
    raw = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    raw["optimizer"]["params"]["lr"] = 3e-3
    config.write_text(json.dumps({**raw, "train_batch_size": 64}))
    train(["--ds_config", str(config), *common(files, "digits", "resnet", run), "--max_steps", "12",
           "--micro_batch_size", "32", "--eval_steps", "12", "--export", "last", "--wandb_mode", "disabled"])
    trained = json.loads((run / "eval_results.json").read_text())
    assert (trained["step"], trained["eval_only"], trained["split"], trained["samples"]) == (12, False, "val", 179)

    out = tmp_path / "eval"
    done = train(["--eval_only", "--ds_config", str(config), "--model", str(run / "model"), "--data",
                  str(files["digits"]), "--output_dir", str(out), "--eval_batch_size", "16", "--precision",
                  "fp32", "--lr", "0.01", "--mixup_alpha", "0.2", "--ema_decay", "0.9"],
                 ranks=3, env={"WANDB_MODE": "offline"})
    assert "train: eval done: 179 images" in done.stdout and str(out / "confusion_matrix.png") in done.stdout
    # training flags on an eval's command line change nothing below, and are named (--lr, at odds with
    # the config's, neither refuses the eval)
    assert ("train: not used by --eval_only (training only): --lr --ema_decay --mixup_alpha (a run trained with "
            "--ema_decay exported its weight average: --model holds it already)") in done.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_only"] and results["model"] == str(run / "model") and results["step"] == 0
    # 179 = 60 + 60 + 59 per rank, in batches of 16: padding counted nowhere
    assert results["samples"] == 179 and results["top1"] == trained["top1"]
    assert results["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert results["per_class"] == trained["per_class"] and results["most_confused"] == trained["most_confused"]
    assert sum(c["samples"] for c in results["per_class"].values()) == 179
    hits = sum(round(c["top1"] * c["samples"]) for c in results["per_class"].values())
    assert hits == round(results["top1"] * 179)

    # predictions: every val sample once, in the split's order whatever the ranks, with its true label
    rows, truth = predictions(out), val_labels(files["digits"])
    assert [r["key"] for r in rows] == [r["key"] for r in predictions(run)]
    assert sorted(r["key"] for r in rows) == sorted(truth)
    assert all(r["label"] == truth[r["key"]] for r in rows)
    for mine, theirs in zip(rows, predictions(run)):
        assert [name for name, _ in mine["top5"]] == [name for name, _ in theirs["top5"]]
        assert [p for _, p in mine["top5"]] == pytest.approx([p for _, p in theirs["top5"]], abs=1e-5)
        assert len(mine["top5"]) == 5 and sorted((p for _, p in mine["top5"]), reverse=True) == [p for _, p in mine["top5"]]
    top1 = sum(r["top5"][0][0] == r["label"] for r in rows)
    assert top1 == round(results["top1"] * 179)
    confused = Counter((r["label"], r["top5"][0][0]) for r in rows if r["top5"][0][0] != r["label"])
    first = results["most_confused"][0]
    assert confused.most_common(1)[0][1] == first["count"] == confused[first["true"], first["predicted"]]

    with Image.open(out / "confusion_matrix.png") as picture:
        assert picture.format == "PNG" and 300 < picture.width < 1200

    # W&B: the scalars, the per-class table and the confusion matrix
    history, config = wandb_history(out)
    logged = history[0]
    assert logged["eval/top1"] == pytest.approx(results["top1"])
    assert logged["eval/per_class/_type"] == "table-file" and logged["eval/per_class/nrows"] == 10
    assert logged["eval/most_confused/nrows"] == len(results["most_confused"])
    assert logged["eval/confusion_matrix_image/_type"] == "image-file"
    assert "eval/confusion_matrix_table" in " ".join(logged)  # W&B's own chart, backed by a table
    assert config["eval_split"] == "val" and config["world_size"] == 3


def test_eval_only_refuses_a_model_trained_for_other_classes(files, tmp_path):
    run = tmp_path / "run"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", run), "--max_steps", "1",
           "--micro_batch_size", "6", "--wandb_mode", "disabled"], ranks=None)
    done = train(["--eval_only", "--model", str(run / "model"), "--data", str(files["digits"]), "--output_dir",
                  str(tmp_path / "eval"), "--wandb_mode", "disabled"], ranks=None, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (f"--model {run / 'model'} was trained for 4 labels (class0, class1, class2, ...), the shards have 10 "
            f"classes in classes.json (0, 1, 2, ...); they first differ at id 0") in done.stderr
    assert not (tmp_path / "eval").exists()
    no_model = train(["--eval_only", "--data", str(files["photos"]), "--wandb_mode", "disabled"], ranks=None,
                     check=False)
    assert no_model.returncode == 2 and "--eval_only evaluates a trained model: pass --model DIR" in no_model.stderr


def test_labels_by_id_evaluate_and_keep_the_head_of_a_model_whose_labels_are_named_otherwise(files, tmp_path):
    """A hub ImageNet model names its labels ('tench, Tinca tinca', ...) where ImageNet's folders are
    synsets (n01440764, ...), in the same id order. The photo shards under other class names:
    --eval_only refuses the model trained on them and says to pass --labels_by_id; with it, it
    evaluates by id (the training run's top-1, predictions under the shards' names), and a run
    fine-tuning it keeps its head, which is new without it."""
    import torch
    from transformers import AutoModelForImageClassification
    from train.model import build_model

    run = tmp_path / "run"
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "resnet", run), "--max_steps", "1",
           "--micro_batch_size", "6", "--wandb_mode", "disabled"], ranks=None)
    renamed = tmp_path / "renamed"
    shutil.copytree(files["photos"], renamed)
    classes, names = json.loads((renamed / "classes.json").read_text()), [f"n0{i}440764" for i in range(4)]
    (renamed / "classes.json").write_text(json.dumps(names))
    manifest = json.loads((renamed / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split["per_class"] = {new: split["per_class"][old] for old, new in zip(classes, names)}
    (renamed / "manifest.json").write_text(json.dumps(manifest))

    flags = ["--eval_only", "--model", str(run / "model"), "--data", str(renamed), "--precision", "fp32",
             "--wandb_mode", "disabled"]
    refused = train([*flags, "--output_dir", str(tmp_path / "refused")], ranks=None, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "they first differ at id 0. Evaluate a model trained on these shards' classes, in their order; or, if its " \
           "label i is class i under another name (a hub ImageNet model on shards of synset folders), pass " \
           "--labels_by_id" in refused.stderr
    done = train([*flags, "--output_dir", str(tmp_path / "by_id"), "--labels_by_id"], ranks=None)
    assert "train: labels by id: 'class0' is 'n00440764', 'class1' is 'n01440764', ... (4 in all)" in done.stdout
    by_id, trained = (json.loads((d / "eval_results.json").read_text()) for d in (tmp_path / "by_id", run))
    assert by_id["samples"] == trained["samples"] == 12 and by_id["top1"] == trained["top1"]
    assert sorted(by_id["per_class"]) == names
    assert {p["label"] for p in predictions(tmp_path / "by_id")} == set(names)

    problems = []
    torch.manual_seed(0)
    kept, _, head = build_model(model=str(run / "model"), model_config=None, processor=None, classes=names,
                                problems=problems, by_id=True)
    assert problems == [] and head.startswith("kept by id (4 classes; ") and "'class0' is 'n00440764'" in head
    torch.manual_seed(0)
    fresh, _, new_head = build_model(model=str(run / "model"), model_config=None, processor=None, classes=names,
                                     problems=problems)
    assert problems == [] and new_head.startswith("new for 4 classes")
    trained_head = {k: v for k, v in AutoModelForImageClassification.from_pretrained(run / "model").state_dict().items()
                    if k.startswith("classifier")}
    assert trained_head and all(kept.state_dict()[k].equal(v) for k, v in trained_head.items())
    assert not all(fresh.state_dict()[k].equal(v) for k, v in trained_head.items())
    assert kept.config.id2label == dict(enumerate(names))
    build_model(model=str(run / "model"), model_config=None, processor=None, classes=names[:3], problems=problems,
                by_id=True)
    assert problems == [f"--labels_by_id: --model {run / 'model'} has 4 labels (class0, class1, class2, ...), the "
                        f"shards 3 classes (n00440764, n01440764, n02440764); label i can be class i only where they "
                        f"are as many"]


def test_image_size_evaluates_and_fine_tunes_a_model_at_another_resolution(files, tmp_path):
    """A ViT trained on 32x32 images, at 48x48 with --image_size 48: --eval_only (Pillow's exact
    resize) predicts what transformers computes on its processor's 48x48 pixels when it
    interpolates the position embeddings (interpolate_pos_encoding); a run fine-tuning it on 2 ranks
    says what it resampled and exports a model and processor at 48 that transformers runs as they
    are; its checkpoint resumes at 48, and at the model's 32 is refused with what to pass. A
    processor of 48 without the flag does the same (a DINOv2 from the hub states 518, its processor 224)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, ViTImageProcessorPil
    from pipelines.spec import spec_from_processor

    run, resampled = tmp_path / "run", ("train: position embeddings resampled from 4x4 to 6x6 patches for 48x48 "
                                        "images (1 tensor, as transformers' interpolate_pos_encoding)")
    train(["--ds_config", "ds_configs/zero2.json", *common(files, "photos", "vit", run), "--max_steps", "2",
           "--micro_batch_size", "6", "--wandb_mode", "disabled"], ranks=None)
    out = tmp_path / "eval48"
    done = train(["--eval_only", "--model", str(run / "model"), "--data", str(files["photos"]), "--image_size", "48",
                  "--eval_resize", "pillow", "--precision", "fp32", "--output_dir", str(out), "--wandb_mode",
                  "disabled"], ranks=None)
    assert resampled in done.stdout and "train: eval done: 12 images" in done.stdout

    model = AutoModelForImageClassification.from_pretrained(run / "model").eval()
    processor = ViTImageProcessorPil(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    classes, images = json.loads((files["photos"] / "classes.json").read_text()), {}
    for shard in sorted((files["photos"] / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext in ("jpg", "jpeg"):
                    images[key] = Image.open(tar.extractfile(member)).convert("RGB")
    rows = predictions(out)
    assert sorted(r["key"] for r in rows) == sorted(images)
    pixels = processor([images[r["key"]] for r in rows], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits.softmax(-1)
    for row, probabilities in zip(rows, expected):
        top = probabilities.topk(len(row["top5"]))
        assert [name for name, _ in row["top5"]] == [classes[i] for i in top.indices]
        assert [p for _, p in row["top5"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    processor.save_pretrained(tmp_path / "processor48")  # another size than the model's config states
    done = train(["--eval_only", "--model", str(run / "model"), "--processor", str(tmp_path / "processor48"),
                  "--data", str(files["photos"]), "--eval_resize", "pillow", "--precision", "fp32", "--output_dir",
                  str(tmp_path / "processor"), "--wandb_mode", "disabled"], ranks=None)
    assert resampled in done.stdout and predictions(tmp_path / "processor") == rows

    tuned = tmp_path / "tuned"
    flags = ["--ds_config", "ds_configs/zero2.json", "--data", str(files["photos"]), "--model", str(run / "model"),
             "--output_dir", str(tuned), "--precision", "fp32", "--micro_batch_size", "6", "--wandb_mode", "disabled"]
    done = train([*flags, "--image_size", "48", "--max_steps", "2"])
    assert resampled in done.stdout
    config = json.loads((tuned / "run_config.json").read_text())
    assert config["resampled"] == resampled.removeprefix("train: ") and config["preprocess"]["resize_to"] == [48, 48]
    exported = AutoModelForImageClassification.from_pretrained(tuned / "model")
    assert exported.config.image_size == 48 and spec_from_processor(tuned / "model").output_size == (48, 48)
    assert exported.vit.embeddings.position_embeddings.shape == (1, 37, 32)
    exported(pixel_values=torch.zeros(1, 3, 48, 48))  # as it is, no interpolation asked for

    refused = train([*flags, "--max_steps", "3", "--resume", "auto"], check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "trained on 48x48 images, this run's are 32x32, and the model's position embeddings are sized for its " \
           "images: resume with --image_size 48" in refused.stderr
    done = train([*flags, "--image_size", "48", "--max_steps", "3", "--resume", "auto"])
    assert "train: resuming from" in done.stdout and "(step 2)" in done.stdout and resampled in done.stdout


def test_confusion_picture_of_many_classes_shows_the_most_confused():
    classes = [f"class {i:03d} with a rather long name" for i in range(120)]
    pairs = Counter({(c, c): 40 for c in range(120)})
    for c in range(50, 50 + MOST_CONFUSED_CLASSES):  # each of these 30 mistaken for the next one, 3..
        pairs[c, c + 1 if c + 1 < 50 + MOST_CONFUSED_CLASSES else 50] += 3 + c % 4
    pairs[7, 7] -= 1
    pairs[7, 100] += 1  # one stray error: 7 and 100 are not among the most confused
    shown = shown_classes(pairs, len(classes))
    assert shown == list(range(50, 50 + MOST_CONFUSED_CLASSES))
    picture = confusion_picture(pairs, classes=classes)
    assert picture.width < 1300 and picture.height < 1300
    small = shown_classes(Counter({(0, 1): 1}), ALL_CLASSES_UP_TO)
    assert small == list(range(ALL_CLASSES_UP_TO))
