"""The DALI graphs: one definition for CPU and GPU, the device a parameter.

On GPU (`device_id` set) JPEGs decode with `device="mixed"` (nvJPEG / the hardware decoder) and
every later operator runs on the GPU; on CPU (`device_id=None`) the same graph runs CPU operators.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from nvidia.dali import fn, math as dmath, pipeline_def, types

from pipelines.spec import PreprocessSpec

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}


class NoGPUError(ValueError):
    """A GPU pipeline asked for on a machine where torch sees no CUDA GPU."""


def device_id_of(device: str | torch.device) -> int | None:
    """DALI's `device_id` for a torch device: the GPU's index, or None (CPU operators) for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():  # DALI's own check is an assert deep in pipeline construction
        raise NoGPUError(f"device {device}: torch sees no CUDA GPU on this machine")
    return device.index or 0


class Decoding(NamedTuple):
    """How JPEGs decode on a GPU (on CPU libjpeg-turbo decodes them, as Pillow does).

    `hw_decoder_load`: the share of JPEGs for the hardware JPEG decoder (A100, H100, H200); the rest
    decode in CUDA kernels, on the SMs the model trains on. None: DALI's default (0.65).
    `fancy_upsampling`: chroma upsampled as libjpeg-turbo (and so Pillow and the HF processors) does
    it, triangular; nvJPEG's default replicates pixels, several grey levels off at colour edges.
    None: on for eval, off for training's fused random-crop decoder (its cost there is unmeasured)."""

    hw_decoder_load: float | None = None
    fancy_upsampling: bool | None = None


def decoder_args(*, gpu: bool, decoding: Decoding, train: bool) -> dict:
    """The decoder operator's device and options."""
    if not gpu:
        return {"device": "cpu"}
    fancy = not train if decoding.fancy_upsampling is None else decoding.fancy_upsampling
    load = {} if decoding.hw_decoder_load is None else {"hw_decoder_load": decoding.hw_decoder_load}
    return {"device": "mixed", "jpeg_fancy_upsampling": fancy, **load}


def decoded(jpegs, *, gpu: bool, decoding: Decoding = Decoding()):
    """JPEG bytes to RGB uint8 HWC: nvJPEG / the hardware decoder on GPU, libjpeg-turbo on CPU."""
    return fn.decoders.image(jpegs, output_type=types.RGB, **decoder_args(gpu=gpu, decoding=decoding, train=False))


def eval_images(jpegs, *, spec: PreprocessSpec, gpu: bool, layout: str = "CHW", dtype=types.FLOAT,
                decoding: Decoding = Decoding()):
    """Decode -> resize -> center crop -> normalize, as the HF processor does.

    Resize sizes are computed per sample from the JPEG header with the processor's rounding
    (long side floored), not left to DALI's; crop offsets are floored like HF's
    (`rounding="truncate"`), and the resize antialiases like PIL.
    """
    images = decoded(jpegs, gpu=gpu, decoding=decoding)
    if spec.resize_to:
        height, width = (float(v) for v in spec.resize_to)
    else:
        shape = fn.peek_image_shape(jpegs, dtype=types.INT64)
        short = dmath.min(shape[0], shape[1])
        height = fn.cast(spec.resize_shortest * shape[0] // short, dtype=types.FLOAT)
        width = fn.cast(spec.resize_shortest * shape[1] // short, dtype=types.FLOAT)
    images = fn.resize(images, resize_y=height, resize_x=width, interp_type=INTERP[spec.interpolation],
                       antialias=True)
    return _normalize(images, spec=spec, crop=spec.crop, layout=layout, dtype=dtype)


def train_images(jpegs, *, spec: PreprocessSpec, gpu: bool, layout: str = "CHW", dtype=types.FLOAT,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, color_jitter: float = 0.0, auto_augment: str | None = None,
                 decoding: Decoding = Decoding()):
    """Random-resized-crop (fused with decoding) to the processor's output size, random flip,
    optional colour jitter and RandAugment/TrivialAugment, the processor's normalization."""
    height, width = spec.output_size
    images = fn.decoders.image_random_crop(
        jpegs, output_type=types.RGB, random_area=list(scale), random_aspect_ratio=list(ratio),
        **decoder_args(gpu=gpu, decoding=decoding, train=True),
    )
    images = fn.resize(images, size=[height, width], interp_type=INTERP[spec.interpolation], antialias=True)
    if color_jitter:
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=[1 - color_jitter, 1 + color_jitter]),
            contrast=fn.random.uniform(range=[1 - color_jitter, 1 + color_jitter]),
            saturation=fn.random.uniform(range=[1 - color_jitter, 1 + color_jitter]),
        )
    if auto_augment == "rand_augment":
        from nvidia.dali.auto_aug import rand_augment

        images = rand_augment.rand_augment(images, n=2, m=9, shape=[height, width])
    elif auto_augment == "trivial_augment":
        from nvidia.dali.auto_aug import trivial_augment

        images = trivial_augment.trivial_augment_wide(images, shape=[height, width])
    elif auto_augment is not None:
        raise ValueError(f"auto_augment must be rand_augment, trivial_augment or None, got {auto_augment!r}")
    return _normalize(images, spec=spec, crop=None, layout=layout, dtype=dtype,
                      mirror=fn.random.coin_flip(probability=hflip) if hflip else 0)


def _normalize(images, *, spec: PreprocessSpec, crop, layout: str, dtype, mirror=0):
    kwargs = dict(crop=list(crop), crop_pos_x=0.5, crop_pos_y=0.5) if crop else {}
    return fn.crop_mirror_normalize(
        images, mean=spec.pixel_mean, std=spec.pixel_std, dtype=dtype, output_layout=layout,
        rounding="truncate", mirror=mirror, **kwargs,
    )


@pipeline_def
def shard_pipeline(*, source, spec: PreprocessSpec, train: bool, gpu: bool, layout: str, dtype, augment: dict,
                   decode_only: bool = False, decoding: Decoding = Decoding()):
    """Preprocess the samples `source` feeds (pipelines/loader.py: JPEG bytes, labels and sample ids
    of this rank's batches, in the epoch's order) and return (images, labels, ids).
    `decode_only`: eval images stay decoded RGB, resized later in torch (pipelines/resize.py).
    DALI's automatic augmentations need `enable_conditionals=True` at construction."""
    jpegs, labels, ids = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.INT64, types.INT64])
    if train:
        images = train_images(jpegs, spec=spec, gpu=gpu, layout=layout, dtype=dtype, decoding=decoding, **augment)
    elif decode_only:
        images = decoded(jpegs, gpu=gpu, decoding=decoding)
    else:
        images = eval_images(jpegs, spec=spec, gpu=gpu, layout=layout, dtype=dtype, decoding=decoding)
    return images, labels, ids


@pipeline_def
def file_pipeline(*, files: list[str], spec: PreprocessSpec | None, gpu: bool, decode_only: bool = False,
                  decoding: Decoding = Decoding()):
    """The eval preprocessing of plain image files, in order (parity checks); with `decode_only`
    (no `spec` needed), the decoded RGB images."""
    jpegs, _ = fn.readers.file(files=files, name="reader")
    if decode_only:
        return decoded(jpegs, gpu=gpu, decoding=decoding)
    return eval_images(jpegs, spec=spec, gpu=gpu, decoding=decoding)
