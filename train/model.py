"""The model and its image processor: pretrained (hub name or folder) or from a config, head sized
from classes.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification

from pipelines.spec import ProcessorError, load_processor

# The built-in default: a small ResNet for 32x32 inputs; from scratch on the digits it passes 95%
# top-1 within 2 epochs (a ViT of the same size needs far more data or epochs)
BUILTIN_MODEL = {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1],
                 "layer_type": "basic", "downsample_in_first_stage": False}
BUILTIN_PROCESSOR = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def build_model(*, model: str | None, model_config: str | dict | None, processor, classes: list[str],
                problems: list[str]):
    """(model, image processor), or (None, None) with what is wrong appended to `problems`.

    A pretrained head of another size is replaced (`ignore_mismatched_sizes`); the full model is
    built on every rank and DeepSpeed partitions it afterwards, which is what makes the head swap
    work under ZeRO-3 too (vision classifiers fit one device before partitioning).
    """
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {name: i for i, name in enumerate(classes)}}
    if model and model_config:
        problems.append("--model and --model_config are exclusive: pretrained weights, or a config to init randomly")
        return None, None
    values = model_source(model=model, model_config=model_config, problems=problems)
    if values is None:
        return None, None
    try:
        if model:
            net = AutoModelForImageClassification.from_pretrained(model, ignore_mismatched_sizes=True, **labels)
        else:
            stated = len(values["id2label"]) if "id2label" in values else values.get("num_labels", len(classes))
            if stated != len(classes):
                problems.append(f"--model_config {model_config} has {stated} labels but the shards have "
                                f"{len(classes)} classes (classes.json); drop num_labels/id2label from the config "
                                f"(the head is sized from the data) or point --data at the right shards")
                return None, None
            values = {k: v for k, v in values.items() if k not in ("architectures", "id2label", "label2id", "num_labels")}
            config = AutoConfig.for_model(**values, **labels)
            net = AutoModelForImageClassification.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        problems.append(_cannot_build(model, model_config, e))
        return None, None
    try:
        if processor is not None:  # a name or folder, or an instance (the built-in default's)
            image_processor = load_processor(processor) if isinstance(processor, (str, Path)) else processor
        elif model:
            image_processor = load_processor(model)
        else:
            problems.append(f"--model_config {model_config}: a model from a config has no image processor; "
                            f"pass --processor NAME_OR_DIR")
            return net, None
    except ProcessorError as e:
        problems.append(f"{e}; pass --processor NAME_OR_DIR")
        return net, None
    return net, image_processor


def model_source(*, model: str | None, model_config: str | dict | None, problems: list[str]):
    """The pretrained model's config, or the config values to build from; None (and a problem) if
    neither loads. Cheap: no weights are read."""
    try:
        if model:
            return AutoConfig.from_pretrained(model)
        return model_config if isinstance(model_config, dict) else json.loads(Path(model_config).read_text())
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        problems.append(_cannot_build(model, model_config, e))
        return None


def builtin_processor():
    """The built-in default's processor: a plain resize to 32x32, mean/std 0.5."""
    return transformers.ViTImageProcessorPil(**BUILTIN_PROCESSOR)


def model_input_size(model) -> tuple[int, int] | None:
    """The (height, width) a model with position embeddings requires; None if it takes any size."""
    size = getattr(model.config, "image_size", None)
    if size is None or not hasattr(model.config, "patch_size"):
        return None
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cannot_build(model, model_config, error: Exception) -> str:
    what = f"--model {model}" if model else f"--model_config {model_config}"
    return (f"{what}: cannot build an image classifier ({_first_line(error)}); use a local folder with config.json, "
            f"a hub name reachable from here, or a config JSON with a model_type")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
