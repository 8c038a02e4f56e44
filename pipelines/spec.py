"""What the input pipeline must do, derived from a model's Hugging Face image processor.

The processor instance is the one source of truth: its own `preprocessor_config.json` values
(size, crop, resample, mean/std, ...) override the class defaults, because they are read from the
instance. Every supported processor reduces to the same steps, which DALI runs:

    decode to RGB -> resize (fixed HxW, or shortest edge with the long side rounded down)
      -> optional center crop (offsets rounded down) -> (x * scale - offset - mean) / std
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The processors whose preprocessing is understood field by field (PIL, torchvision and
# "Fast" variants share a name once the suffix is dropped).
SUPPORTED = (
    "ViTImageProcessor", "DeiTImageProcessor", "ConvNextImageProcessor", "BeitImageProcessor",
    "BitImageProcessor", "CLIPImageProcessor", "SiglipImageProcessor", "MobileNetV2ImageProcessor",
    "LevitImageProcessor", "EfficientNetImageProcessor",
)
INTERPOLATIONS = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample ids


class ProcessorError(ValueError):
    """A processor whose preprocessing the pipelines cannot reproduce."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything the DALI graph needs; all sizes are (height, width)."""

    processor: str  # class name, for messages and the run config
    resize_shortest: int | None  # shortest edge to this, long side floor(s * long / short)
    resize_to: tuple[int, int] | None  # or a fixed size (exactly one of the two is set)
    crop: tuple[int, int] | None  # center crop after resizing, None: no crop
    interpolation: str  # "bilinear", "bicubic" or "nearest"
    scale: float  # rescale factor (1/255)
    offset: float  # subtracted after rescaling (EfficientNet's rescale_offset)
    mean: tuple[float, float, float]  # in rescaled units, as the processor states them
    std: tuple[float, float, float]

    @property
    def output_size(self) -> tuple[int, int]:
        """The (height, width) of every preprocessed image."""
        return self.crop or self.resize_to or (self.resize_shortest, self.resize_shortest)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to (HF's rounding: long side floored)."""
        if self.resize_to:
            return self.resize_to
        short = min(height, width)
        return self.resize_shortest * height // short, self.resize_shortest * width // short

    @property
    def pixel_mean(self) -> list[float]:
        """Mean in 0-255 pixel units: (x - pixel_mean) / pixel_std equals the processor's math."""
        return [(m + self.offset) / self.scale for m in self.mean]

    @property
    def pixel_std(self) -> list[float]:
        return [s / self.scale for s in self.std]


def load_processor(name_or_dir: str | Path):
    """The image processor of a hub name or a local folder holding preprocessor_config.json."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(name_or_dir))
    except (OSError, ValueError) as e:
        raise ProcessorError(f"cannot load an image processor from {name_or_dir!r}: {e}") from None


def spec_from_processor(processor) -> PreprocessSpec:
    """The PreprocessSpec that reproduces `processor` (an instance, or a name/folder to load)."""
    if isinstance(processor, (str, Path)):
        processor = load_processor(processor)
    name = type(processor).__name__.removesuffix("Pil").removesuffix("Fast")
    get = lambda field, default=None: getattr(processor, field, default)  # noqa: E731
    if name not in SUPPORTED:
        fields = sorted(k for k in processor.to_dict() if k not in ("image_processor_type", "processor_class"))
        raise ProcessorError(
            f"{name} is not supported: cannot map its fields {fields} to a DALI pipeline; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    problems = []
    if not get("do_resize", True):
        problems.append("do_resize=False (images of different sizes cannot be batched)")
    for field in ("do_pad", "do_reduce_labels"):
        if get(field):
            problems.append(f"{field}=True")
    resample = int(get("resample", 2))
    if resample not in INTERPOLATIONS:
        problems.append(f"resample={resample} (supported: {INTERPOLATIONS})")

    size = get("size")
    shortest = size.shortest_edge if size is not None else None
    if size is None or size.longest_edge or size.max_height or size.max_pixels or not (shortest or (size.height and size.width)):
        problems.append(f"size={size}")
    crop = None
    if get("do_center_crop"):
        crop_size = get("crop_size")
        crop = (crop_size.height, crop_size.width) if crop_size is not None and crop_size.height else None
        if crop is None:
            problems.append(f"crop_size={crop_size}")
    elif shortest and name != "ConvNextImageProcessor":  # (ConvNeXt's own rule makes squares, below)
        problems.append(f"size={{'shortest_edge': {shortest}}} without a center crop (each image would keep its "
                        f"aspect ratio: sizes that differ cannot be batched, nor fed to a model of one input size; "
                        f"set do_center_crop and crop_size, or size height and width)")
    if problems:
        raise ProcessorError(f"{name}: cannot map {'; '.join(problems)}")

    resize_shortest, resize_to = None, None
    if name == "ConvNextImageProcessor" and shortest:
        # ConvNeXt (and ResNet, RegNet): below 384, resize to shortest/crop_pct then crop a square
        if shortest < 384:
            resize_shortest, crop = int(shortest / get("crop_pct", 224 / 256)), (shortest, shortest)
        else:
            resize_to = (shortest, shortest)
    elif name == "LevitImageProcessor" and shortest:
        resize_shortest = int((256 / 224) * shortest)
    elif shortest:
        resize_shortest = shortest
    else:
        resize_to = (size.height, size.width)

    if crop is not None:
        smallest = resize_to or (resize_shortest, resize_shortest)
        if crop[0] > smallest[0] or crop[1] > smallest[1]:
            raise ProcessorError(f"{name}: crop {crop} is larger than the resized image {smallest}")

    scale = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0
    offset = 1.0 if name == "EfficientNetImageProcessor" and get("rescale_offset") else 0.0
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if get("do_normalize", True):
        mean, std = _triple(get("image_mean")), _triple(get("image_std"))
    if name == "EfficientNetImageProcessor" and get("include_top", True):
        # EfficientNet's include_top divides by std a second time
        std = tuple(s * t for s, t in zip(std, _triple(get("image_std"))))
    return PreprocessSpec(
        processor=name, resize_shortest=resize_shortest, resize_to=resize_to, crop=crop,
        interpolation=INTERPOLATIONS[resample], scale=scale, offset=offset, mean=mean, std=std,
    )


def _triple(value) -> tuple[float, float, float]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    if len(values) != 3:
        raise ProcessorError(f"expected 3 channel values, got {value}")
    return tuple(values)


def processor_at_size(processor, size: int):
    """A copy of `processor` that makes size x size images (fine-tuning at another resolution):
    its crop becomes `size` and its resize scales with it (DeiT's 256 then 224 becomes 439 then
    384 at 384), except ConvNeXt's, which follows its own rule at the new shortest edge (a
    crop_pct crop below 384, a plain resize from 384)."""
    spec = spec_from_processor(processor)
    height, width = spec.output_size
    if height != width:
        raise ProcessorError(f"{spec.processor} makes {height}x{width} images; --image_size makes square ones "
                             f"(write a processor with the size you want and pass --processor)")
    values = processor.to_dict()
    if spec.processor == "ConvNextImageProcessor" and values["size"].get("shortest_edge"):
        values["size"] = {"shortest_edge": size}
    else:
        values["size"] = {key: round(value * size / height) for key, value in values["size"].items() if value}
        if spec.crop:
            values["crop_size"] = {"height": size, "width": size}
    return type(processor).from_dict(values)
