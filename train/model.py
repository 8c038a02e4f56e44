"""The model and its image processor: pretrained (hub name or folder) or from a config, head sized
from classes.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification

from pipelines.shards import class_name
from pipelines.spec import ProcessorError, load_processor
from train.checkpoint import MARKER, checkpoints_under

# The built-in default: a small ResNet for 32x32 inputs; from scratch on the digits it passes 95%
# top-1 within 2 epochs (a ViT of the same size needs far more data or epochs)
BUILTIN_MODEL = {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1],
                 "layer_type": "basic", "downsample_in_first_stage": False}
BUILTIN_PROCESSOR = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def build_model(*, model: str | None, model_config: str | dict | None, processor, classes: list[str],
                problems: list[str], by_id: bool = False, drop_path: float | None = None):
    """(model, image processor, what became of a pretrained head), or (None, None, None) with what
    is wrong appended to `problems`. `drop_path`: the stochastic depth rate the model is built with
    (its config's drop_path_rate; None: the config's own).

    A pretrained head of another size is replaced (`ignore_mismatched_sizes`, then adapt_head); the
    full model is built on every rank and DeepSpeed partitions it afterwards, which is what makes the
    head swap work under ZeRO-3 too (vision classifiers fit one device before partitioning).
    """
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {name: i for i, name in enumerate(classes)}}
    if model and model_config:
        problems.append("--model and --model_config are exclusive: pretrained weights, or a config to init randomly")
        return None, None, None
    values = model_source(model=model, model_config=model_config, problems=problems)
    if values is None:
        return None, None, None
    if model_config:
        stated = len(values["id2label"]) if "id2label" in values else values.get("num_labels", len(classes))
        if stated != len(classes):
            problems.append(f"--model_config {model_config} has {stated} labels but the shards have "
                            f"{len(classes)} classes (classes.json); drop num_labels/id2label from the config "
                            f"(the head is sized from the data) or point --data at the right shards")
            return None, None, None
    overrides = {} if drop_path is None else {"drop_path_rate": drop_path}
    if overrides and not _has_drop_path(values):
        kind = values.get("model_type") if isinstance(values, dict) else values.model_type
        problems.append(f"--drop_path: transformers' {kind} has no stochastic depth (no drop_path_rate in its config; "
                        f"ConvNeXt, Swin, BEiT, DINOv2 and others have one); drop the flag")
        return None, None, None
    try:
        if model:
            net = AutoModelForImageClassification.from_pretrained(model, ignore_mismatched_sizes=True, **overrides,
                                                                   **labels)
        else:
            values = {k: v for k, v in values.items() if k not in ("architectures", "id2label", "label2id", "num_labels")}
            # architectures [] (not None): the model type's plain classifier, where transformers maps a type
            # to several (DeiT, LeViT: with a distillation head too) and fails on None
            net = AutoModelForImageClassification.from_config(AutoConfig.for_model(**{**values, **overrides}, **labels,
                                                                                    architectures=[]))
    except (OSError, ValueError, KeyError) as e:
        problems.append(_cannot_build(model, model_config, e))
        return None, None, None
    except Exception as e:  # the model's own code failed on values it cannot build from
        problems.append(_inconsistent(model, model_config, e))
        return None, None, None
    head = None
    if model:
        pretrained = model_labels(values)
        if by_id and len(pretrained) != len(classes):
            problems.append(by_id_mismatch(model, pretrained, classes))
            return None, None, None
        head = (f"kept by id ({len(classes)} classes; {model}'s labels named otherwise: {by_id_pairs(pretrained, classes)})"
                if by_id and pretrained != classes else adapt_head(net, model, pretrained, classes))
    try:
        if processor is not None:  # a name or folder, or an instance (the built-in default's)
            image_processor = load_processor(processor) if isinstance(processor, (str, Path)) else processor
        elif model:
            image_processor = load_processor(model)
        else:
            problems.append(f"--model_config {model_config}: a model from a config has no image processor; "
                            f"pass --processor NAME_OR_DIR")
            return net, None, None
    except ProcessorError as e:
        problems.append(f"{e}; pass --processor NAME_OR_DIR")
        return net, None, None
    return net, image_processor, head


def load_trained(*, model: str, processor, classes: list[str], problems: list[str], by_id: bool = False):
    """(model, image processor) of a trained classifier as it is, head and labels untouched, or
    (None, None) with the problem noted: its labels must be `classes`, in their order (`by_id`: as
    many, named as they may be)."""
    values = model_source(model=model, model_config=None, problems=problems)
    if values is None:
        return None, None
    labels = model_labels(values)
    if by_id and len(labels) != len(classes):
        problems.append(by_id_mismatch(model, labels, classes))
        return None, None
    if labels != classes and not by_id:
        differ = next((i for i, (a, b) in enumerate(zip(labels, classes)) if a != b), min(len(labels), len(classes)))
        problems.append(f"--model {model} was trained for {len(labels)} labels ({_names(labels)}), the shards have "
                        f"{len(classes)} classes in classes.json ({_names(classes)}); they first differ at id {differ}. "
                        f"Evaluate a model trained on these shards' classes, in their order"
                        + ("; or, if its label i is class i under another name (a hub ImageNet model on shards of "
                           "synset folders), pass --labels_by_id" if len(labels) == len(classes) else ""))
        return None, None
    try:
        net = AutoModelForImageClassification.from_pretrained(model)
        image_processor = load_processor(processor if processor is not None else model)
    except ProcessorError as e:
        problems.append(f"{e}; pass --processor NAME_OR_DIR")
        return None, None
    except (OSError, ValueError, KeyError) as e:
        problems.append(_cannot_build(model, None, e))
        return None, None
    except Exception as e:  # the model's own code failed on values it cannot build from
        problems.append(_inconsistent(model, None, e))
        return None, None
    return net, image_processor


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The parameters in `dtype`, buffers as prepare_precision left them: what DeepSpeed's
    engine does to a model it trains in bf16/fp16."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def model_labels(config) -> list:
    """A model config's label names in id order, in Unicode NFC as make_shards writes class names
    (a model trained on shards of a Mac's decomposed folder names still matches them)."""
    labels = [config.id2label.get(i) for i in range(config.num_labels)]
    return [class_name(label) if isinstance(label, str) else label for label in labels]


def by_id_mismatch(model: str, labels: list, classes: list[str]) -> str:
    return (f"--labels_by_id: --model {model} has {len(labels)} labels ({_names(labels)}), the shards "
            f"{len(classes)} classes ({_names(classes)}); label i can be class i only where they are as many")


def by_id_pairs(labels: list, classes: list[str], shown: int = 2) -> str:
    """How the first labels named otherwise map to classes, in words."""
    pairs = [(a, b) for a, b in zip(labels, classes) if a != b]
    more = f", ... ({len(pairs)} in all)" if len(pairs) > shown else ""
    return ", ".join(f"{a!r} is {b!r}" for a, b in pairs[:shown]) + more


def _names(names: list, shown: int = 3) -> str:
    return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")


def adapt_head(net, model: str, pretrained: list, classes: list[str]) -> str:
    """The head for `classes`, from a pretrained one made for the labels `pretrained`: kept when those
    are these classes in this order; else initialised afresh, and each class the pretrained model
    knows by name (in any position) takes its trained row back. Returns what was done, in words."""
    if pretrained == classes:
        return f"kept ({len(classes)} classes, as {model} was trained)"
    head = reinit_head(net)
    rows = {new: pretrained.index(name) for new, name in enumerate(classes) if name in pretrained}
    if not rows:
        return (f"new for {len(classes)} classes ({model} was trained for {len(pretrained)} labels, none of "
                f"them these classes)")
    source = AutoModelForImageClassification.from_pretrained(model)  # its head as trained
    new, old = torch.tensor(list(rows)), torch.tensor(list(rows.values()))
    with torch.no_grad():
        for name, dim in head.items():
            target = net.get_parameter(name)
            target.index_copy_(dim, new, source.get_parameter(name).index_select(dim, old).to(target.dtype))
    return (f"{len(rows)} of {len(classes)} classes' rows from {model}'s head (matched by name), "
            f"{len(classes) - len(rows)} new")


def head_parameters(net) -> dict[str, int]:
    """The classifier head's parameter names, each with the dimension that runs over the labels. The
    head is what depends on the number of labels: found by building the model with one label more
    on the meta device and comparing shapes."""
    with torch.device("meta"):
        probe = AutoModelForImageClassification.from_config(
            AutoConfig.for_model(**{**net.config.to_dict(), "num_labels": net.config.num_labels + 1,
                                    "id2label": None, "label2id": None}))
    shapes = {name: p.shape for name, p in probe.named_parameters()}
    return {name: next(d for d, (a, b) in enumerate(zip(shapes[name], p.shape)) if a != b)
            for name, p in net.named_parameters() if shapes.get(name) != p.shape}


def freeze_backbone(net) -> int:
    """Only the classifier head trains (a linear probe of the model's features): every other
    parameter is frozen, and every module but the head's (and the ones holding it) stays in eval
    mode whatever the engine asks, so dropout and stochastic depth are off and BatchNorm keeps its
    trained statistics. Returns the number of frozen parameters."""
    head = head_parameters(net)
    holders = {""} | {".".join(name.split(".")[:i]) for name in head for i in range(1, name.count(".") + 1)}
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name in head)
    plain_train = net.train

    def train(mode: bool = True):
        plain_train(mode)
        for name, module in net.named_modules():
            module.training = module.training and name in holders
        return net

    net.train = train  # what DeepSpeed's engine.train() calls
    net.train(net.training)
    return sum(p.numel() for p in net.parameters() if not p.requires_grad)


def reinit_head(net) -> dict[str, int]:
    """Initialises the classifier head afresh, as the model's own init does; returns its parameters'
    names, each with the dimension that runs over the labels (head_parameters)."""
    head = head_parameters(net)
    for module_name in sorted({name.rsplit(".", 1)[0] for name in head}):
        module = net.get_submodule(module_name)
        for target in (module, *module.parameters(recurse=False)):
            if hasattr(target, "_is_hf_initialized"):  # set on loaded weights: init would skip them
                delattr(target, "_is_hf_initialized")
        net._init_weights(module)
    return head


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


def _has_drop_path(values) -> bool:
    """Whether a model's config (or config values) has a stochastic depth rate, drop_path_rate
    (an unknown model type: True, its build says what is wrong)."""
    if isinstance(values, dict):
        try:
            values = transformers.CONFIG_MAPPING[values.get("model_type")]()
        except KeyError:
            return True
    return hasattr(values, "drop_path_rate")


def builtin_processor():
    """The built-in default's processor: a plain resize to 32x32, mean/std 0.5."""
    return transformers.ViTImageProcessorPil(**BUILTIN_PROCESSOR)


def model_at_size(net, size: tuple[int, int]) -> tuple[torch.nn.Module, str | None]:
    """`net` for (height, width) `size` images, and what was resampled (None: nothing). A model
    whose config states an image size gets `size` there (what its export says); where parameters'
    shapes follow it (position embeddings of ViT, DeiT, BEiT, DINOv2, CLIP, SigLIP, Swin; BEiT's
    relative position bias tables), a copy built at `size` takes the weights, those resampled as
    transformers interpolates them in the forward pass (`interpolate_pos_encoding`: bicubic; BEiT's
    tables bilinear), once instead of at every step. A ValueError names a parameter that is neither
    (LeViT's attention biases) or a model that cannot be built at `size`."""
    config = net.config
    stated = _image_size(config)
    if stated is None or _pair(stated) == size:
        return net, None
    resized = _at(config, size)
    changed = _reshaped(net, resized)
    if not changed:
        _vision(config).image_size = _image_size(resized)
        return net, None
    before, after = _grid(config, _pair(stated)), _grid(config, size)
    state = net.state_dict()
    for key, shape in changed.items():
        state[key] = _resampled(key, state[key], shape, before=before, after=after)
    fitted = _built(net, resized, device="cpu")
    fitted.load_state_dict(state)
    fitted.train(net.training)
    kinds = " and ".join(sorted({"relative position bias tables" if key.endswith("table") else "position embeddings"
                                 for key in changed}))
    return fitted.to(next(net.parameters()).dtype), (
        f"{kinds} resampled from {before[0]}x{before[1]} to {after[0]}x{after[1]} patches for {size[0]}x{size[1]} "
        f"images ({len(changed)} tensor{'s' * (len(changed) > 1)}, as transformers' interpolate_pos_encoding)")


def size_bound(net) -> bool:
    """Whether `net`'s parameter shapes follow its image size (position embeddings: a checkpoint
    trained at one size does not load at another)."""
    stated = _image_size(net.config)
    if stated is None:
        return False
    return bool(_reshaped(net, _at(net.config, tuple(2 * side for side in _pair(stated)))))


def _vision(config):
    """The config that states the image size and patch size (CLIP's and SigLIP's: their vision config)."""
    return getattr(config, "vision_config", None) or config


def _image_size(config):
    return getattr(_vision(config), "image_size", None)


def _at(config, size: tuple[int, int]):
    """A copy of `config` stating (height, width) `size`, as an int where it stated one and can."""
    config = copy.deepcopy(config)
    square = not isinstance(_image_size(config), (list, tuple)) and size[0] == size[1]
    _vision(config).image_size = size[0] if square else list(size)
    return config


def _reshaped(net, config) -> dict[str, torch.Size]:
    """The state of `net` whose shapes differ in `net` built from `config` (on the meta device),
    with their shapes there."""
    shapes = {key: value.shape for key, value in _built(net, config, device="meta").state_dict().items()}
    return {key: shapes[key] for key, value in net.state_dict().items() if value.shape != shapes[key]}


def _built(net, config, *, device: str):
    try:
        with torch.device(device):
            return type(net)(config)
    except Exception as e:  # the model's own code rejects the size
        raise ValueError(f"{type(net).__name__} cannot be built for {_image_size(config)} images "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _grid(config, size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of `size` images."""
    patch = _pair(getattr(_vision(config), "patch_size", None) or 0)
    return (size[0] // patch[0], size[1] // patch[1]) if patch[0] else (0, 0)


def _resampled(key: str, value: torch.Tensor, shape: torch.Size, *, before: tuple[int, int],
               after: tuple[int, int]) -> torch.Tensor:
    """`value` (for a `before` patch grid) resampled to `shape` (for `after`), as transformers does
    in the forward pass; a ValueError if it is no position embedding or bias table of that grid."""
    functional = torch.nn.functional
    if key.endswith(("position_embeddings", "position_embedding.weight")):  # (1,) prefix + grid, dim
        tokens = value.reshape(-1, value.shape[-1])
        prefix = len(tokens) - before[0] * before[1]  # class, distillation tokens
        if 0 <= prefix <= 2 and shape.numel() == (prefix + after[0] * after[1]) * value.shape[-1]:
            grid = tokens[prefix:].float().reshape(1, *before, -1).permute(0, 3, 1, 2)
            grid = functional.interpolate(grid, size=after, mode="bicubic", align_corners=False)
            return torch.cat([tokens[:prefix], grid.permute(0, 2, 3, 1).reshape(-1, value.shape[-1]).to(value.dtype)]
                             ).reshape(shape)
    if key.endswith("relative_position_bias_table"):  # BEiT: (2h - 1)(2w - 1) offsets + 3 class-token rows
        sides, new_sides = [2 * n - 1 for n in before], [2 * n - 1 for n in after]
        if len(value) == sides[0] * sides[1] + 3 and shape[0] == new_sides[0] * new_sides[1] + 3:
            table = value[:-3].float().reshape(1, sides[1], sides[0], -1).permute(0, 3, 1, 2)
            table = functional.interpolate(table, size=new_sides, mode="bilinear")
            return torch.cat([table.permute(0, 2, 3, 1).reshape(-1, value.shape[-1]).to(value.dtype), value[-3:]])
    raise ValueError(f"its {key} is {tuple(value.shape)} at its image size and {tuple(shape)} at this one, and is "
                     f"no position embedding or relative position bias table of its {before[0]}x{before[1]} patches "
                     f"to resample")


def prepare_precision(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Readies a model for DeepSpeed's `dtype` training, which casts the parameters only:
    BatchNorm keeps its running statistics in fp32 (in bf16 an 8-bit mantissa stalls their
    momentum updates, and an fp16 sum across ranks can overflow) and computes with its weight and
    bias upcast, as torch's batch_norm takes bf16/fp16 input with fp32 statistics; every other
    floating-point buffer follows the parameters' dtype."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if type(module) not in _FP32_STATS:
                _FP32_STATS[type(module)] = type(f"{type(module).__name__}Fp32Stats", (_Fp32Stats, type(module)), {})
            module.__class__ = _FP32_STATS[type(module)]
        else:
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(module, name, buffer.to(dtype))


class _Fp32Stats:
    """BatchNorm with fp32 running statistics beside bf16/fp16 parameters (see prepare_precision)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = torch.nn.functional.batch_norm(
            input, self.running_mean if track else None, self.running_var if track else None, weight, bias,
            use_batch, factor, self.eps)
        return out.to(input.dtype)


_FP32_STATS: dict[type, type] = {}


# Parameters that are embeddings or tokens rather than weights of a transformation: not decayed
# (timm's no_weight_decay: cls token, position embeddings, ...), whatever their shape
NO_DECAY_NAMES = {"cls_token", "distillation_token", "mask_token", "register_tokens", "position_embeddings",
                  "pos_embed", "absolute_pos_embed", "relative_position_bias_table", "lambda_1", "lambda_2",
                  "layer_scale_parameter"}
NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)


def parameter_groups(model: torch.nn.Module, *, lr: float | None = None, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, normalization layers, embeddings, class/position
    tokens and layer scales (by kind, not by shape: ViT's cls token is 3-d); decay on the rest.
    With `layer_decay` (the model has `layer_stages`), each depth of `layer_depths` is a pair
    of groups whose learning rate is lr x layer_decay^(L + 1 - depth), the head's first (the rate
    train/lr shows)."""
    depths = layer_depths(model, layer_stages(model)) if layer_decay != 1.0 else {}
    top = max(depths.values(), default=0)
    groups: dict[tuple[int, bool], list] = {(top, False): [], (top, True): []}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = (isinstance(module, NORMS) or "norm" in type(module).__name__.lower() or p.ndim <= 1
                      or name == "bias" or name in NO_DECAY_NAMES)
            depth = depths.get(f"{module_name}.{name}" if module_name else name, top)
            groups.setdefault((depth, exempt), []).append(p)
    ordered = sorted(groups, key=lambda key: (-key[0], key[1]))
    if not depths:
        return [{"params": groups[key], **({"weight_decay": 0.0} if key[1] else {})} for key in ordered]
    return [{"params": groups[key], **({"weight_decay": 0.0} if key[1] else {}), "lr": lr * layer_decay ** (top - key[0]),
             "lr_scale": layer_decay ** (top - key[0])} for key in ordered if groups[key]]


def layer_stages(model: torch.nn.Module) -> list[tuple[str, list[str]]] | None:
    """The model's stack of layers in order, as (stage, [its layers' module names]): what layer-wise
    lr decay counts depth in. One stage for a stack of layers, which ViT, DeiT, BEiT, DINOv2 and the
    CLIP and SigLIP vision models call `layer` or `layers` (num_hidden_layers of them); else stages
    of `blocks` or `layers` each: Swin's, ConvNeXt's, ResNet's, RegNet's (what a stage holds besides,
    its downsampling, goes with its nearest block: Swin's last, as SimMIM counts; ConvNeXt's first,
    as timm and ConvNeXt V2 count). None for a model with neither (EfficientNet's, MobileNet's)."""
    config = getattr(model.config, "vision_config", None) or model.config

    def flat(stack: torch.nn.Module) -> bool:  # its layers hold no stack of their own
        return not any(isinstance(inner, torch.nn.ModuleList) for layer in stack for inner in layer.modules())

    stacks = [(name, [f"{name}.{i}" for i in range(len(module))]) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")
              and len(module) == getattr(config, "num_hidden_layers", None) and flat(module)
              and not any(part.isdigit() for part in name.split("."))]  # not one stage's (ConvNeXt's)
    if len(stacks) == 1:
        return stacks
    for name, module in model.named_modules():  # stages, each with a stack of blocks
        if not (isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "stages")):
            continue
        blocks = [_blocks(stage) for stage in module]
        if blocks and all(found and len(found[1]) and flat(found[1]) for found in blocks):
            return [(f"{name}.{s}", [f"{name}.{s}.{attr}.{b}" for b in range(len(stack))])
                    for s, (attr, stack) in enumerate(blocks)]
    return None


def _blocks(stage: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """A stage's stack of blocks and its name: Swin's `blocks`, ConvNeXt's and ResNet's `layers`."""
    for attr in ("blocks", "layers"):
        stack = getattr(stage, attr, None)
        if isinstance(stack, (torch.nn.ModuleList, torch.nn.Sequential)):
            return attr, stack
    return None


def layer_depths(model: torch.nn.Module, stages: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Each parameter's depth for layer-wise lr decay, counted as BEiT, MAE and SimMIM count it: 0
    for the embeddings (patch and position embeddings, class token; a convolutional stem), i + 1
    for the i-th layer of `stages` (a stage's other parameters: those before its first layer, as
    ConvNeXt's downsampling, that layer's; those after, as Swin's, its last layer's), L + 1 for the
    rest (the final norm, the pooler, the head; BEiT's shared relative position bias)."""
    layers = [layer for _, stage in stages for layer in stage]
    top = len(layers) + 1
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # as registered: as run
    spans = {stage: (order[names[0]], layers.index(names[0]) + 1, layers.index(names[-1]) + 1)
             for stage, names in stages}

    def depth(name: str) -> int:
        layer = next((i for i, prefix in enumerate(layers) if name.startswith(prefix + ".")), None)
        if layer is not None:
            return layer + 1
        stage = next((prefix for prefix in spans if name.startswith(prefix + ".")), None)
        if stage is not None:
            first_module, first, last = spans[stage]
            return first if order[name.rsplit(".", 1)[0]] < first_module else last
        return 0 if STEMS & set(name.split(".")) else top

    return {name: depth(name) for name, _ in model.named_parameters()}


STEMS = {"embeddings", "embedder"}  # ViT's patch and position embeddings; ResNet's, RegNet's, BiT's stem


def _cannot_build(model, model_config, error: Exception) -> str:
    what = f"--model {model}" if model else f"--model_config {model_config}"
    if model and (training_run := _training_folder(Path(model))):
        return f"{what}: {training_run}"
    return (f"{what}: cannot build an image classifier ({_first_line(error)}); use a local folder with config.json, "
            f"a hub name reachable from here, or a config JSON with a model_type")


def _training_folder(path: Path) -> str | None:
    """What to pass instead of a folder of a training run that is no model: its output dir (the
    model is in OUTPUT/model), or a checkpoint or the folder of them (exported first)."""
    if (path / "model" / "config.json").is_file():
        return f"a training run's output dir; its model is {path / 'model'}"
    _, complete = checkpoints_under(path)
    checkpoint = path if (path / MARKER).is_file() else complete[-1] if complete else None
    if checkpoint is not None:
        return (f"{'a checkpoint' if checkpoint == path else 'a folder of checkpoints'}, not a model: export one "
                f"with `python tools/export_checkpoint.py {checkpoint} OUT`, then pass --model OUT")
    return None


def _inconsistent(model, model_config, error: Exception) -> str:
    what = f"--model {model}" if model else f"--model_config {model_config}"
    return (f"{what}: transformers failed building the model from its config ({type(error).__name__}: "
            f"{_first_line(error)}); check that its values agree with each other (e.g. as many hidden_sizes as "
            f"stages) and with the model type's config class in transformers")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
