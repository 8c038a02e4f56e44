"""pipelines/: processor specs, parity with the HF processors, and the sharded DALI loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers

from check_parity import FAMILIES, grey_level_differences, summarize
from conftest import ROOT, encode, photo, write
from make_shards import make_shards
from pipelines.dali import Decoding
from pipelines.loader import DataError, create_loader
from pipelines.shards import ShardFormatError, load_manifest, read_index
from pipelines.spec import ProcessorError, spec_from_processor

T = transformers
PROCESSORS = {name: lambda make=make: make(T) for name, make in FAMILIES.items()}
# (width, height): landscape, portrait, odd crop margins, smaller than the target, square, extreme
PARITY_SIZES = [(500, 375), (375, 500), (333, 251), (97, 61), (224, 224), (640, 427), (251, 333), (1001, 97)]
TINY_VIT = lambda: T.ViTImageProcessorPil(size={"height": 16, "width": 16})  # noqa: E731


@pytest.fixture(scope="module")
def parity_images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("parity")
    files = []
    for i, size in enumerate(PARITY_SIZES):
        files.append(folder / f"{i}_{size[0]}x{size[1]}.jpg")
        photo(i, size).save(files[-1], quality=90)
    return files


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """Digits: 1618 train samples in 17 shards, 179 (odd) val samples in 2 shards."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    make_shards(src="sklearn:digits", out=out, max_count=100, progress=False)
    return out


@pytest.fixture(scope="module")
def many_class_shards(tmp_path_factory) -> Path:
    """119 classes (labels up to 118) x 3 real images: 238 train, 119 val."""
    root = tmp_path_factory.mktemp("many")
    for c in range(119):
        for i in range(3):
            write(root / "src" / f"c{c:03d}" / f"{i}.jpg", encode(photo(c * 3 + i, (20, 16)), "JPEG", quality=90))
    make_shards(src=root / "src", out=root / "shards", val_fraction=0.34, max_count=40, progress=False)
    return root / "shards"


@pytest.mark.parametrize("name", PROCESSORS)
def test_eval_pipeline_matches_the_hf_processor(name, parity_images):
    figures = summarize(grey_level_differences(PROCESSORS[name](), parity_images))
    assert figures["mean"] <= 0.2 and figures["p99"] <= 1, figures
    assert figures["max_interior"] <= 10 and figures["max"] <= 16, figures


def test_efficientnet_nearest_matches_all_but_a_few_pixels(parity_images):
    # NEAREST picks a neighbouring source pixel where DALI's and PIL's sample positions round apart
    figures = summarize(grey_level_differences(T.EfficientNetImageProcessorPil(resample=0), parity_images))
    print("efficientnet nearest", figures)
    assert figures["mean"] <= 0.2 and figures["p99"] <= 1, figures


@pytest.mark.parametrize("name", [*PROCESSORS, "efficientnet-nearest"])
def test_pillow_eval_resize_is_bit_identical_to_the_pil_backend(name, parity_images):
    processor = T.EfficientNetImageProcessorPil(resample=0) if name == "efficientnet-nearest" else PROCESSORS[name]()
    figures = summarize(grey_level_differences(processor, parity_images, resize="pillow"))
    assert figures["mean"] == 0 and figures["max"] == 0, figures  # the bound: mean <= 0.01, max <= 2


@pytest.mark.parametrize("name", [*PROCESSORS, "efficientnet-nearest"])
def test_torch_eval_resize_is_closer_to_the_pil_backend_than_dalis(name, parity_images):
    processor = T.EfficientNetImageProcessorPil(resample=0) if name == "efficientnet-nearest" else PROCESSORS[name]()
    figures = summarize(grey_level_differences(processor, parity_images, resize="torch"))
    # measured: mean 0.0005-0.043, max 1-3 (DALI's own resize: mean 0.13-0.16, max 4-7)
    assert figures["mean"] <= 0.05 and figures["p99"] <= 1 and figures["max"] <= 3, figures


@pytest.mark.gpu
@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize("resize, bounds", [("dali", dict(mean=0.25, p99=2, max=16)), ("pillow", dict(mean=0.1, max=4))])
def test_gpu_eval_pipeline_matches_the_hf_processor(name, resize, bounds, parity_images):
    """The GPU eval path (nvJPEG with libjpeg-turbo's chroma upsampling) against the processor's PIL
    backend: the bounds asked for, not yet measured on a GPU."""
    figures = summarize(grey_level_differences(PROCESSORS[name](), parity_images, gpu=True, resize=resize))
    assert all(figures[key] <= bound for key, bound in bounds.items()), (resize, figures)


def test_pil_resize_equals_pillow_for_any_sizes():
    """Random sizes up and down, every filter: both pass orders of Pillow 13 and its NEAREST path."""
    import random

    import numpy as np
    from PIL import Image
    from pipelines.resize import pil_resize

    rng = random.Random(3)
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC}
    for n in range(40):
        width, height = rng.randint(1 if n % 8 == 0 else 3, 4 if n % 8 == 0 else 400), rng.randint(3, 600)
        size = (rng.randint(3, 300), width if n % 5 == 0 else rng.randint(3, 300))
        image = photo(n, (width, height))
        for name, resample in filters.items():
            expected = np.asarray(image.resize(size[::-1], resample))
            got = pil_resize(torch.from_numpy(np.array(image)), size, name).numpy()
            assert np.array_equal(got, expected), (width, height, size, name)


@pytest.mark.parametrize("name", [*PROCESSORS, "efficientnet-nearest", "vit-bilinear"])
def test_batched_eval_resize_equals_image_by_image(name, parity_images, monkeypatch):
    """The GPU's default (each pass one matrix product over a group of images), run on the CPU:
    `pillow` bit-identical to Pillow's arithmetic image by image, whatever the grouping; `torch`
    within a grey level or two of torch's uint8 kernels."""
    import numpy as np
    from PIL import Image
    from pipelines import resize as R

    processor = {"efficientnet-nearest": lambda: T.EfficientNetImageProcessorPil(resample=0),
                 "vit-bilinear": lambda: T.ViTImageProcessorPil(resample=2)}.get(name, PROCESSORS.get(name))()
    spec = spec_from_processor(processor)
    images = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in parity_images]
    images += [torch.from_numpy(np.array(photo(50 + i, size))) for i, size in enumerate([(4, 611), (611, 9), (500, 375)])]
    exact = R.eval_batch(images, spec, "pillow", batched=False)
    slow = R.eval_batch(images, spec, "torch", batched=False)
    for float64 in (True, False):  # float64 sums; float32 sums of the weights' bytes
        monkeypatch.setattr(R, "FLOAT64", float64)
        monkeypatch.setattr(R, "GROUP_BYTES", 512 << 20)
        assert torch.equal(R.eval_batch(images, spec, "pillow", batched=True), exact), float64
        monkeypatch.setattr(R, "GROUP_BYTES", 3 * 700 * 700 * 8)  # about one image per group
        assert len(R._groups([R._plan(i.shape[0], i.shape[1], spec, "pillow") for i in images])) >= 8
        assert torch.equal(R.eval_batch(images, spec, "pillow", batched=True), exact), float64
        grey = (R.eval_batch(images, spec, "torch", batched=True) - slow).abs() * torch.tensor(spec.pixel_std)[:, None, None]
        assert grey.max() < 2.01 and grey.mean() <= 0.01, (float64, grey.max(), grey.mean())


def test_float32_batched_exact_resize_takes_float64_where_bytes_could_overflow(monkeypatch):
    """A shrink so steep that an output pixel sums more than SPLIT_TAPS source pixels: float32 sums
    of byte-sized weights are no longer sure to stay below 2^24 there (an error would rarely show
    after Pillow's rounding), so that group goes float64, still Pillow's exactly."""
    import numpy as np
    from pipelines import resize as R

    spec = spec_from_processor(T.ViTImageProcessorPil())  # 224 x 224 whatever the input
    steep = torch.from_numpy(np.array(photo(60, (30000, 3)).point(lambda v: min(255, v + 160))))  # bright: big sums
    plan = R._plan(steep.shape[0], steep.shape[1], spec, "pillow")
    assert R._taps(plan, spec.interpolation) > R.SPLIT_TAPS
    monkeypatch.setattr(R, "FLOAT64", False)
    widths, resize_group = [], R._resize_group

    def recorded(*args, wide: bool, **kwargs):
        widths.append(wide)
        return resize_group(*args, wide=wide, **kwargs)

    monkeypatch.setattr(R, "_resize_group", recorded)
    ordinary = torch.from_numpy(np.array(photo(61, (500, 375))))
    batched = R.eval_batch([steep, ordinary], spec, "pillow", batched=True)
    assert sorted(widths) == [False, True]  # the steep one alone in float64
    assert torch.equal(batched, R.eval_batch([steep, ordinary], spec, "pillow", batched=False))


def test_pil_resize_follows_each_pillow_versions_pass_order():
    from pipelines.resize import vertical_first

    tall = (611, 4, 101, 360)  # (in height, in width, out height, out width)
    assert [vertical_first(*tall, version=v) for v in ((12, 1), (12, 2), (12, 3), (13, 0))] == [False, True, True, True]
    shrinks_height = (333, 251, 224, 224)
    assert [vertical_first(*shrinks_height, version=v) for v in ((12, 3), (13, 0))] == [False, True]
    assert not vertical_first(375, 500, 224, 224, version=(13, 0))


def test_exact_eval_loader_gives_the_processor_output(digit_shards):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    processor = T.ViTImageProcessorPil(size={"height": 20, "width": 20})
    loader = create_loader(data=digit_shards, split="val", spec=spec_from_processor(processor), batch_size=16,
                           train=False, device="cpu", resize="pillow", channels_last=True)
    batches = list(loader)
    assert len(batches) == 12 and sum(int(b["mask"].sum()) for b in batches) == 179
    assert batches[0]["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    pixels = {k: p for b in batches for k, p, m in zip(b["keys"], b["pixel_values"], b["mask"]) if m}
    with tarfile.open(sorted((digit_shards / "val").glob("*.tar"))[0]) as tar:
        jpegs = {m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    for key, data in list(jpegs.items())[:20]:
        expected = processor(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert np.abs(pixels[key].numpy() - expected).max() < 1e-5, key
    with pytest.raises(ValueError, match="resize='pillow' is for eval loaders"):
        create_loader(data=digit_shards, split="train", spec=spec_from_processor(processor), batch_size=16,
                      train=True, device="cpu", resize="pillow")


def traced_operators(*, gpu: bool, train: bool, spec, **kwargs) -> tuple[dict[str, str], list[str]]:
    """Trace a shard pipeline's graph without building it (DALI's `_build_graph`, the step before
    the backend needs CUDA, is where DALI checks that every operator accepts its inputs' device):
    {operator: device}, and the devices of the outputs (images, labels, sample ids)."""
    from nvidia.dali import types
    from pipelines.dali import shard_pipeline

    pipe = shard_pipeline(source=lambda info: None, spec=spec, train=train, gpu=gpu, layout="CHW", dtype=types.FLOAT,
                          batch_size=2, num_threads=1, device_id=0 if gpu else None, **kwargs)
    pipe._build_graph()
    names = {op._op: getattr(op._op, "schema_name", type(op._op).__name__) for op in pipe._ops}
    return {names[op._op]: op._op.device for op in pipe._ops}, [node.device for node in pipe._graph_out]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_one_graph_definition_serves_both_devices(gpu):
    """The GPU graphs trace on any machine: mixed decode, every image operator on the GPU, labels
    on the CPU; the CPU graphs have no GPU operator."""
    image_ops = {"Resize", "CropMirrorNormalize", "ColorTwist"}
    for train, processor, kwargs in [
        (False, T.ViTImageProcessorPil(), dict(augment={})),  # fixed size
        (False, T.ConvNextImageProcessorPil(size={"shortest_edge": 224}), dict(augment={})),  # shortest edge
        (False, T.ViTImageProcessorPil(), dict(augment={}, decode_only=True)),
        (True, T.ViTImageProcessorPil(), dict(augment={"color_jitter": 0.4})),
        (True, T.ViTImageProcessorPil(), dict(augment={"auto_augment": "rand_augment"}, enable_conditionals=True)),
    ]:
        operators, outputs = traced_operators(gpu=gpu, train=train, spec=spec_from_processor(processor), **kwargs)
        decoders = {name: device for name, device in operators.items() if name.startswith("decoders__")}
        assert list(decoders.values()) == ["mixed" if gpu else "cpu"], (train, operators)
        assert outputs == (["gpu", "cpu", "cpu"] if gpu else ["cpu", "cpu", "cpu"]), (train, kwargs)
        if gpu:
            assert all(operators[name] == "gpu" for name in image_ops & set(operators)), operators
        else:
            assert set(operators.values()) == {"cpu"}, operators


def traced_decoder_args(*, gpu: bool, train: bool, **kwargs) -> dict:
    """The arguments of a shard pipeline's one decoder, from its traced graph."""
    from nvidia.dali import types
    from pipelines.dali import shard_pipeline

    pipe = shard_pipeline(source=lambda info: None, spec=spec_from_processor(T.ViTImageProcessorPil()), train=train,
                          gpu=gpu, layout="CHW", dtype=types.FLOAT, batch_size=2, num_threads=1,
                          device_id=0 if gpu else None, augment={}, **kwargs)
    pipe._build_graph()
    (decoder,) = [op._op for op in pipe._ops if getattr(op._op, "schema_name", "").startswith("decoders__")]
    return decoder._init_args


GRAPHS = [(False, {}), (False, dict(decode_only=True)), (True, {})]  # (train, arguments): every decoder there is


def test_gpu_eval_decoder_upsamples_chroma_as_libjpeg_does():
    """nvJPEG replicates chroma pixels unless asked; libjpeg-turbo (Pillow, the HF processors)
    interpolates. Every GPU eval graph asks; training's random-crop decoder does not."""
    for train, kwargs in GRAPHS:
        decoder = traced_decoder_args(gpu=True, train=train, **kwargs)
        assert decoder.get("jpeg_fancy_upsampling", False) is (not train), (train, kwargs)


def test_decoding_options_reach_every_gpu_decoder_and_no_cpu_one():
    for train, kwargs in GRAPHS:
        chosen = Decoding(hw_decoder_load=1.0, fancy_upsampling=True)
        assert traced_decoder_args(gpu=True, train=train, decoding=chosen, **kwargs)["hw_decoder_load"] == 1.0
        assert traced_decoder_args(gpu=True, train=train, decoding=chosen, **kwargs)["jpeg_fancy_upsampling"] is True
        assert "hw_decoder_load" not in traced_decoder_args(gpu=True, train=train, **kwargs)  # DALI's default
        cpu = traced_decoder_args(gpu=False, train=train, decoding=chosen, **kwargs)
        assert "hw_decoder_load" not in cpu and "jpeg_fancy_upsampling" not in cpu


def test_check_parity_all_tabulates_every_family_and_resize(parity_images):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_parity.py"), "--all", "--families", "vit",
                             "clip", "--images", str(parity_images[0].parent)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(table["decoder"]) == ["default"] and table["decoder"]["default"]["max"] == 0  # CPU: one decoder
    assert list(table["families"]) == ["vit", "clip"]
    assert all(list(row) == ["dali", "torch", "pillow"] for row in table["families"].values())
    families = table["families"]
    assert families["clip"]["pillow"]["max"] == 0 and families["vit"]["dali"]["mean"] > 0  # what the CPU tests bound
    assert "| clip | " in result.stdout and "`pillow` resize" in result.stdout


def test_check_parity_decoder_only_compares_decoded_pixels_with_pillow(parity_images):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_parity.py"), "--decoder-only",
                             "--images", str(parity_images[0].parent)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["images"] == len(parity_images)
    assert figures["max"] == 0  # on CPU both decode with libjpeg-turbo: the same pixels


@pytest.mark.gpu
@pytest.mark.parametrize("resize", ["dali", "torch", "pillow"])
def test_gpu_eval_loader_gives_the_cpu_loaders_batches(resize, digit_shards):
    spec = spec_from_processor(T.ViTImageProcessorPil(size={"height": 20, "width": 20}))
    batches = {device: list(create_loader(data=digit_shards, split="val", spec=spec, batch_size=16, train=False,
                                          device=device, resize=resize)) for device in ("cpu", "cuda")}
    assert len(batches["cuda"]) == len(batches["cpu"]) == 12
    for cpu, gpu in zip(batches["cpu"], batches["cuda"]):
        assert gpu["pixel_values"].is_cuda and gpu["labels"].is_cuda and gpu["pixel_values"].dtype == torch.float32
        assert gpu["keys"] == cpu["keys"] and torch.equal(gpu["labels"].cpu(), cpu["labels"])
        assert torch.equal(gpu["mask"].cpu(), cpu["mask"])
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: close, not equal
        grey_levels = (gpu["pixel_values"].cpu() - cpu["pixel_values"]).abs() * torch.tensor(spec.std)[:, None, None] * 255
        assert grey_levels.mean() <= 1, (resize, grey_levels.mean())


@pytest.mark.gpu
def test_gpu_train_loader_output_and_exact_resume(digit_shards):
    make = lambda device, state=None: create_loader(  # noqa: E731
        data=digit_shards, split="train", spec=spec_from_processor(TINY_VIT()), batch_size=16, train=True,
        device=device, seed=3, dtype=torch.bfloat16, channels_last=True, state=state,
        augment={"color_jitter": 0.2, "auto_augment": "rand_augment"})
    loader = make("cuda")
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    assert [b["keys"] for b in first] == [b["keys"] for b, _ in zip(make("cpu"), range(3))]  # the reader's order
    pixels = first[0]["pixel_values"]
    assert pixels.is_cuda and pixels.dtype == torch.bfloat16 and pixels.shape == (16, 3, 16, 16)
    assert pixels.is_contiguous(memory_format=torch.channels_last) and first[0]["labels"].is_cuda
    state = loader.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = iter(make("cuda", state))
    for want in expected:
        got = next(resumed)
        assert got["keys"] == want["keys"] and torch.equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*PROCESSORS, "efficientnet-nearest"])
def test_exact_resize_on_the_gpu_equals_the_cpus(name, parity_images):
    """The same integer arithmetic on CUDA tensors: bit-identical to Pillow there too."""
    import numpy as np
    from PIL import Image
    from pipelines.resize import eval_image

    processor = T.EfficientNetImageProcessorPil(resample=0) if name == "efficientnet-nearest" else PROCESSORS[name]()
    spec = spec_from_processor(processor)
    for path in parity_images:
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
        assert torch.equal(eval_image(image.cuda(), spec, "pillow").cpu(), eval_image(image, spec, "pillow")), path


@pytest.mark.gpu
@pytest.mark.parametrize("float64", [True, False])
@pytest.mark.parametrize("name", ["vit", "convnext-crop-pct", "clip"])
def test_batched_exact_resize_on_the_gpu_equals_the_cpus(name, float64, parity_images, monkeypatch):
    """The GPU loader's default: matrix products on CUDA (float64, or float32 sums of the weights'
    bytes, with TF32 allowed: exact either way), Pillow's result bit for bit."""
    import numpy as np
    from PIL import Image
    from pipelines import resize as R

    spec = spec_from_processor(PROCESSORS[name]())
    images = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in parity_images]
    expected = R.eval_batch(images, spec, "pillow")
    monkeypatch.setattr(R, "FLOAT64", float64)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert torch.equal(R.eval_batch([image.cuda() for image in images], spec, "pillow").cpu(), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_asking_for_a_gpu_without_one_is_a_clear_error(digit_shards, parity_images, tmp_path):
    with pytest.raises(ValueError, match="device cuda: torch sees no CUDA GPU on this machine"):
        create_loader(data=digit_shards, split="val", spec=spec_from_processor(TINY_VIT()), batch_size=8,
                      train=False, device="cuda")
    TINY_VIT().save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_parity.py"), "--processor", str(tmp_path),
                             "--images", str(parity_images[0].parent), "--device", "gpu"], capture_output=True, text=True)
    assert result.returncode == 2 and "device cuda: torch sees no CUDA GPU on this machine" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_checkpoint_config_overrides_class_defaults(tmp_path):
    T.ConvNextImageProcessorPil(size={"shortest_edge": 160}, crop_pct=0.9, image_mean=[0.4, 0.5, 0.6],
                                resample=2).save_pretrained(tmp_path)
    spec = spec_from_processor(tmp_path)
    assert (spec.resize_shortest, spec.crop, spec.interpolation) == (177, (160, 160), "bilinear")
    assert spec.mean == (0.4, 0.5, 0.6) and spec.output_size == (160, 160)
    levit = spec_from_processor(T.LevitImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}))
    assert (levit.resize_shortest, levit.crop) == (128, (112, 112))
    effnet = spec_from_processor(T.EfficientNetImageProcessorPil(rescale_offset=True, image_std=[0.5, 0.25, 0.5]))
    assert effnet.offset == 1.0 and effnet.std == (0.25, 0.0625, 0.25)  # include_top divides by std twice


def test_unmappable_processors_are_named(tmp_path):
    with pytest.raises(ProcessorError, match=r"DetrImageProcessor is not supported: cannot map its fields \[.*'size'"):
        spec_from_processor(T.DetrImageProcessorPil())
    with pytest.raises(ProcessorError, match="ViTImageProcessor: cannot map do_resize=False"):
        spec_from_processor(T.ViTImageProcessorPil(do_resize=False))
    # a shortest-edge resize without a crop keeps each image's aspect ratio: the first eval, after an
    # epoch of training, failed in the model ("Input image size (32*38) doesn't match model (32*32)")
    for processor in (T.CLIPImageProcessorPil(do_center_crop=False), T.ViTImageProcessorPil(size={"shortest_edge": 32})):
        with pytest.raises(ProcessorError, match=r"cannot map size=\{'shortest_edge': (224|32)\} without a center crop"):
            spec_from_processor(processor)
    with pytest.raises(ProcessorError, match="cannot load an image processor from"):
        spec_from_processor(tmp_path / "nowhere")


def test_a_processor_at_another_size_scales_its_resize_with_its_crop(tmp_path):
    """--image_size N: each family's processor makes N x N images, its resize scaled with its crop,
    ConvNeXt's by its own rule at the new shortest edge; the processor itself (what the export
    saves and transformers runs) agrees with the spec DALI reproduces."""
    from pipelines.spec import processor_at_size

    cases = {  # processor -> (resize_shortest, resize_to, crop) at 384
        T.ViTImageProcessorPil(): (None, (384, 384), None),
        T.DeiTImageProcessorPil(): (None, (439, 439), (384, 384)),  # 256 then 224: 256 x 384 / 224
        T.CLIPImageProcessorPil(): (384, None, (384, 384)),
        T.BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}): (439, None, (384, 384)),
        T.LevitImageProcessorPil(): (438, None, (384, 384)),  # its own 256/224 on the scaled shortest edge
        T.ConvNextImageProcessorPil(size={"shortest_edge": 224}): (None, (384, 384), None),  # from 384: no crop
    }
    image = photo(3, (96, 72))
    for processor, expected in cases.items():
        resized = processor_at_size(processor, 384)
        spec = spec_from_processor(resized)
        assert type(resized) is type(processor) and (spec.resize_shortest, spec.resize_to, spec.crop) == expected
        assert spec.output_size == (384, 384) and resized(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 384, 384)
        assert spec.mean == spec_from_processor(processor).mean and spec.interpolation == spec_from_processor(processor).interpolation
        resized.save_pretrained(tmp_path / type(processor).__name__)
        assert spec_from_processor(tmp_path / type(processor).__name__) == spec
    convnext = spec_from_processor(processor_at_size(T.ConvNextImageProcessorPil(size={"shortest_edge": 384}), 288))
    assert (convnext.resize_shortest, convnext.crop) == (329, (288, 288))  # below 384: 288 / crop_pct 0.875
    assert spec_from_processor(processor_at_size(T.ViTImageProcessorPil(), 224)) == spec_from_processor(T.ViTImageProcessorPil())
    with pytest.raises(ProcessorError, match=r"ViTImageProcessor makes 32x48 images; --image_size makes square ones"):
        processor_at_size(T.ViTImageProcessorPil(size={"height": 32, "width": 48}), 64)


def test_check_parity_cli(tmp_path, parity_images):
    T.BitImageProcessorPil(size={"shortest_edge": 160}, crop_size={"height": 144, "width": 144}).save_pretrained(tmp_path / "proc")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_parity.py"), "--processor", str(tmp_path / "proc"),
         "--images", str(parity_images[0].parent)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 + len(parity_images) + 1
    figures = json.loads(lines[-1])
    assert set(figures) == {"mean", "p99", "max", "max_interior", "images"} and figures["images"] == len(parity_images)
    assert figures["mean"] <= 0.2 and figures["p99"] <= 1 and figures["max"] <= 16


def all_keys(data: Path, split: str) -> set[str]:
    return {sample[0].name.split(".")[0] for tar in sorted((data / split).glob("*.idx")) for sample in read_index(tar)}


def test_eval_loader_counts_every_val_sample_once(digit_shards):
    loader = create_loader(data=digit_shards, split="val", spec=spec_from_processor(TINY_VIT()), batch_size=16,
                           train=False, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 12  # ceil(179 / 16)
    keys = [k for b in batches for k, m in zip(b["keys"], b["mask"]) if m]
    labels = torch.cat([b["labels"][b["mask"]] for b in batches])
    assert len(keys) == len(set(keys)) == 179 and set(keys) == all_keys(digit_shards, "val")
    classes = json.loads((digit_shards / "classes.json").read_text())
    per_class = load_manifest(digit_shards)["splits"]["val"]["per_class"]
    assert Counter(classes[i] for i in labels.tolist()) == Counter(per_class)
    assert batches[0]["pixel_values"].shape == (16, 3, 16, 16) and batches[0]["pixel_values"].dtype == torch.float32


def test_train_loader_epoch_outputs_and_exact_resume(digit_shards):
    spec = spec_from_processor(TINY_VIT())
    make = lambda state=None: create_loader(  # noqa: E731
        data=digit_shards, split="train", spec=spec, batch_size=16, train=True, device="cpu", seed=3,
        dtype=torch.bfloat16, channels_last=True, augment={"color_jitter": 0.2, "auto_augment": "trivial_augment"},
        state=state)
    loader = make()
    assert len(loader) == 1618 // 16
    epoch = list(loader)
    keys = [k for b in epoch for k in b["keys"]]
    assert len(epoch) == 101 and len(keys) == len(set(keys)) == 1616  # two dropped, none repeated
    pixels = epoch[0]["pixel_values"]
    assert pixels.shape == (16, 3, 16, 16) and pixels.dtype == torch.bfloat16
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    second_epoch_keys = [k for b in loader for k in b["keys"]]
    assert second_epoch_keys != keys  # reshuffled

    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = iter(make(state))
    for want in expected:
        got = next(resumed)
        assert got["keys"] == want["keys"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])  # same augmentation RNG too


def test_an_epoch_resumed_on_other_ranks_reads_each_unread_sample_once(digit_shards):
    """4 ranks of 16 read 5 batches of epoch 2, 3 ranks of 20 resume and read 4 more, 2 ranks of
    32 read the rest (1,618 samples: no size divides): no sample twice, fewer than a batch per
    rank left out; the next epoch is whole again, and a resplit epoch resumes exactly too."""
    from pipelines.loader import resplit

    spec = spec_from_processor(TINY_VIT())
    make = lambda rank, world, batch, state=None: create_loader(  # noqa: E731
        data=digit_shards, split="train", spec=spec, batch_size=batch, train=True, rank=rank, world_size=world,
        device="cpu", num_threads=1, seed=3, state=state)

    def read(world: int, batch: int, state: dict | None, batches: int | None) -> tuple[list[str], dict]:
        keys, states = [], []
        for rank in range(world):
            loader = make(rank, world, batch, state)
            if state is None:
                list(loader)  # epoch 1
            it = iter(loader)
            keys += [k for _, b in zip(range(batches or 10**6), it) for k in b["keys"]]
            states.append(loader.state_dict())
        assert all(s["epoch"] == states[0]["epoch"] and s["step"] == states[0]["step"] for s in states)
        return keys, states[0]

    first, state = read(4, 16, None, 5)
    resplit_state = resplit(state, world_size=4, batch_size=16)
    second, state = read(3, 20, resplit_state, 4)
    assert (state["epoch"], state["step"], state["taken"]) == (1, 4, [[4, 80]])
    loader = make(1, 3, 20, resplit_state)  # exact resume inside the resplit epoch
    it = iter(loader)
    for _ in range(4):
        next(it)
    saved = loader.state_dict()
    expected = [next(it)["keys"] for _ in range(2)]
    resumed = iter(make(1, 3, 20, saved))
    assert expected == [next(resumed)["keys"] for _ in range(2)]
    third, state = read(2, 32, resplit(state, world_size=3, batch_size=20), None)
    epoch = first + second + third
    assert len(epoch) == len(set(epoch)) and 1618 - 2 * 33 < len(epoch) <= 1618
    assert (len(first), len(second), len(third)) == (320, 240, 32 * 2 * ((1618 - 320 - 240) // 2 // 32))
    loader = make(0, 2, 32, state)
    assert loader.progress() == pytest.approx(2.0, abs=0.03)
    next_epoch = [k for rank in range(2) for b in make(rank, 2, 32, state) for k in b["keys"]]
    assert len(next_epoch) == len(set(next_epoch)) == 2 * 25 * 32  # whole: 1,618 // 2 // 32 batches a rank


def true_labels(data: Path, split: str) -> dict[str, int]:
    """{key: label} read from the tars with tarfile (not with the loader's reader)."""
    import tarfile

    labels = {}
    for tar_path in sorted((data / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            labels.update({m.name[:-4]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")})
    return labels


def spearman(a: list[str], b: list[str]) -> float:
    """Rank correlation of the positions of the keys both orders hold."""
    import numpy as np

    common = set(a) & set(b)
    pos_a = {k: i for i, k in enumerate(k for k in a if k in common)}
    pos_b = {k: i for i, k in enumerate(k for k in b if k in common)}
    x = np.array([pos_a[k] for k in common], dtype=float)
    y = np.array([pos_b[k] for k in common], dtype=float)
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.parametrize("world", [3, 4])
def test_every_epoch_and_every_eval_is_exact_on_any_world_size(digit_shards, world):
    """1618 train / 179 val over 3 or 4 ranks (nothing divides), four epochs and four evals, in one
    process through create_loader(rank=, world_size=): train batches are full, hold no padding, no
    sample twice in an epoch, and a fresh order each epoch; every eval counts each val sample once."""
    spec = spec_from_processor(TINY_VIT())
    labels = {split: true_labels(digit_shards, split) for split in ("train", "val")}
    make = lambda split, train, batch: [  # noqa: E731
        create_loader(data=digit_shards, split=split, spec=spec, batch_size=batch, train=train, rank=r,
                      world_size=world, device="cpu", num_threads=1, seed=5) for r in range(world)]
    train = make("train", True, 77)  # (1618 // W) // 77 batches: 7 (W=3: 1617 of 1618 used) or 5 (W=4)
    steps = (1618 // world) // 77
    orders = []
    for epoch in range(4):
        epoch_keys = []
        for rank, loader in enumerate(train):
            batches = list(loader)
            assert len(batches) == len(loader) == steps
            for b in batches:
                assert len(b["keys"]) == 77 and bool(b["mask"].all())
                assert b["labels"].tolist() == [labels["train"][k] for k in b["keys"]]
            epoch_keys += [k for b in batches for k in b["keys"]]
        assert len(epoch_keys) == len(set(epoch_keys)) == world * steps * 77, epoch  # nothing repeated, no padding
        orders.append(epoch_keys)
    assert all(abs(spearman(a, b)) < 0.2 for a, b in zip(orders, orders[1:]))
    for batch in (16, 89):  # 89: a rank's part ends exactly at a batch boundary, or leaves a whole padding batch
        val = make("val", False, batch)
        for evaluation in range(4):
            counted = []
            for loader in val:
                batches = list(loader)
                assert len(batches) == len(loader) == -(-(-(-179 // world)) // batch)
                for b in batches:
                    assert b["labels"].tolist() == [labels["val"][k] for k in b["keys"]]
                counted += [k for b in batches for k, m in zip(b["keys"], b["mask"]) if m]
            assert sorted(counted) == sorted(labels["val"]), (batch, evaluation)  # each exactly once


def test_eval_pixels_do_not_depend_on_ranks_or_batch(digit_shards):
    spec = spec_from_processor(TINY_VIT())

    def pixels(world: int, batch: int) -> dict[str, torch.Tensor]:
        out = {}
        for rank in range(world):
            loader = create_loader(data=digit_shards, split="val", spec=spec, batch_size=batch, train=False, rank=rank,
                                   world_size=world, device="cpu", num_threads=1)
            for _ in range(2):  # the second pass too: nothing of the first leaks into it
                for b in loader:
                    out.update({k: p for k, p, m in zip(b["keys"], b["pixel_values"], b["mask"]) if m})
        return out

    one, three = pixels(1, 16), pixels(3, 89)
    assert one.keys() == three.keys() and len(one) == 179
    assert all(torch.equal(one[k], three[k]) for k in one)


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> Path:
    """6,000 train samples (real digit images, repeated under distinct names) in 30 shards:
    several times more than any shuffle buffer."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("big")
    digits = load_digits()
    jpegs = [encode(Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8)), "JPEG", quality=90) for d in digits.images]
    for n in range(6000):
        write(root / "src" / f"c{digits.target[n % 1797]}" / f"{n:05d}.jpg", jpegs[n % 1797])
    make_shards(src=root / "src", out=root / "shards", val_fraction=0, max_count=200, progress=False)
    return root / "shards"


def test_each_epoch_is_a_fresh_seeded_permutation(big_shards):
    spec = spec_from_processor(TINY_VIT())
    make = lambda seed, **kw: create_loader(data=big_shards, split="train", spec=spec, batch_size=100,  # noqa: E731
                                            train=True, device="cpu", num_threads=1, seed=seed, **kw)
    loader = make(0)
    orders = [[k for b in loader for k in b["keys"]] for _ in range(4)]
    assert all(len(o) == len(set(o)) == 6000 for o in orders)
    tenth = 600
    for a, b in zip(orders, orders[1:]):  # three consecutive pairs
        assert abs(spearman(a, b)) <= 0.2, spearman(a, b)
        assert len(set(a[:tenth]) & set(b[:tenth])) < 2 * tenth * tenth / 6000  # a fresh permutation: about 10%
    first_shard = {sample[0].name.split(".")[0] for sample in read_index(big_shards / "train" / "shard-000000.idx")}
    assert len(first_shard & set(orders[0][:200])) < 40  # not read shard by shard: about 7 of 200
    assert [k for b in make(0) for k in b["keys"]] == orders[0]  # same seed, same order
    assert [k for b in make(1) for k in b["keys"]] != orders[0]
    # four ranks: disjoint parts of the same permutation, and exact resume in a later epoch
    ranks = [make(0, rank=r, world_size=4) for r in range(4)]
    parts = [[k for b in loader for k in b["keys"]] for loader in ranks]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 6000
    loader = ranks[2]
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (1, 7)
    expected = [next(it)["keys"] for _ in range(3)]
    resumed = iter(make(0, rank=2, world_size=4, state=state))
    assert [next(resumed)["keys"] for _ in range(3)] == expected


@pytest.mark.parametrize("world", [3, 4])
def test_ranks_under_the_launcher_split_every_epoch_exactly(many_class_shards, tmp_path, world):
    """Three or four real ranks, 238 train / 119 val (neither divides), three epochs and evals."""
    from conftest import free_port

    manifest = load_manifest(many_class_shards)
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["val"]["samples"]) == (238, 119)
    subprocess.run(["deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()),
                    str(ROOT / "tests" / "dist_loader_script.py"), str(many_class_shards), str(tmp_path), "7", "3"],
                   check=True, capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    labels = {split: true_labels(many_class_shards, split) for split in ("train", "val")}
    train_steps = (238 // world) // 7  # 11 or 8
    for split, steps in (("train", train_steps), ("val", -(-(-(-119 // world)) // 7))):  # val: 6 or 5
        for epoch in range(3):
            seen = [r[split][epoch] for r in ranks]
            assert [s["steps"] for s in seen] == [s["len"] for s in seen] == [steps] * world
            assert all(size == 7 for s in seen for size in s["sizes"])
            samples = [tuple(x) for s in seen for x in s["samples"]]
            assert len(samples) == len(set(samples))  # nothing twice
            assert all(labels[split][k] == label for k, label in samples)
            if split == "val":
                assert {k for k, _ in samples} == set(labels["val"])  # every val sample, at every eval
            else:
                assert len(samples) == world * train_steps * 7
    train_orders = [[k for r in ranks for k, _ in r["train"][epoch]["samples"]] for epoch in range(3)]
    assert train_orders[0] != train_orders[1] != train_orders[2]


def test_preflight_errors_say_what_to_change(digit_shards, tmp_path):
    spec = spec_from_processor(TINY_VIT())
    common = dict(spec=spec, batch_size=8, device="cpu")
    with pytest.raises(ShardFormatError, match=r"1618 samples over 9 ranks is less than one batch of 200 per rank"):
        create_loader(data=digit_shards, split="train", train=True, rank=0, world_size=9, **{**common, "batch_size": 200})
    # DALI shards by sample: 2 val shards serve 4 ranks (and 200 ranks, with fully masked batches)
    assert len(create_loader(data=digit_shards, split="val", train=False, rank=3, world_size=4, **common)) == 6
    assert len(create_loader(data=digit_shards, split="val", train=False, rank=199, world_size=200, **common)) == 1
    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy)
    shard = copy / "train" / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-10240])
    with pytest.raises(ShardFormatError, match=rf"{shard}: \d+ bytes, manifest says \d+ \(truncated or modified\)"):
        create_loader(data=copy, split="train", train=True, **common)
    make_shards(src="sklearn:digits", out=tmp_path / "noval", val_fraction=0, progress=False)
    with pytest.raises(ShardFormatError, match="split 'val' is empty"):
        create_loader(data=tmp_path / "noval", split="val", train=False, **common)


def test_undecodable_sample_at_run_time_names_shard_and_key(digit_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digit_shards, copy)
    shard = copy / "val" / "shard-000001.tar"
    entry = read_index(shard.with_suffix(".idx"))[4][1]
    data = bytearray(shard.read_bytes())
    data[entry.offset : entry.offset + entry.size] = bytes(entry.size)  # same size: pre-flight passes
    shard.write_bytes(data)
    loader = create_loader(data=copy, split="val", spec=spec_from_processor(TINY_VIT()), batch_size=8,
                           train=False, device="cpu")
    with pytest.raises(DataError, match=rf"shard {shard}, sample {entry.name.split('.')[0]}"):
        list(loader)


def test_a_dali_failure_without_a_bad_sample_is_not_called_a_data_error(digit_shards):
    """A failure inside DALI that no sample explains (here an injected out-of-memory error) is a
    PipelineError with DALI's message, found by checking only the batches in flight."""
    from pipelines.loader import PipelineError

    loader = create_loader(data=digit_shards, split="val", spec=spec_from_processor(TINY_VIT()), batch_size=8,
                           train=False, device="cpu")

    class OutOfMemory:
        def run(self):
            raise RuntimeError("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`\n"
                               "CUDA allocation failed: out of memory\nCurrent pipeline object is no longer valid.")

    loader.pipe = OutOfMemory()
    with pytest.raises(PipelineError, match=r"DALI failed at batch 0 of epoch 0 \(CUDA allocation failed: out of "
                                            r"memory\); every sample of the batches in flight decodes") as error:
        next(iter(loader))
    assert not isinstance(error.value, DataError) and "tools/verify_shards.py" in str(error.value)
