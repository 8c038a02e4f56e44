"""The trainer's arguments: one typed dataclass, each field's doc is its `--help` line.

Fields that DeepSpeed's config also holds (micro batch, accumulation, lr, ...) default to None:
the config's value wins when it is a number, the CLI fills it when the config says "auto"; both
set to different numbers is a configuration error (see train/config.py).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields


class ConfigError(ValueError):
    """Everything wrong with a run's configuration, found before any work, in one message."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


def arg(default, doc: str, *, within: str | None = None, **kwargs):
    """A field and its --help line; `within`: the values it takes, an interval such as "[0, 1)" or
    "[1, inf)" (out_of_range names a value outside it)."""
    return field(default=default, metadata={"doc": doc, "within": within, **kwargs})


def train_arg(default, doc: str, **kwargs):
    """A flag that only training reads: --eval_only names it when given (it changes nothing there)."""
    return arg(default, doc, training_only=True, **kwargs)


@dataclass
class TrainArgs:
    ds_config: str = arg("ds_configs/zero2.json", "DeepSpeed config JSON; \"auto\" values are filled from these arguments")
    data: str | None = arg(None, "shards written by tools/make_shards.py (default: scikit-learn's digits, built into a cache folder)")
    model: str | None = arg(None, "pretrained model: hub name or local folder (its head is resized to the classes)")
    model_config: str | None = arg(None, "model config JSON with a model_type, trained from random init")
    processor: str | None = arg(None, "image processor (hub name or folder) when the model has none")
    image_size: int | None = arg(None, "train and evaluate at N x N pixels: the processor's crop becomes N, its resize "
                                 "scaled with it; a model's position embeddings are resampled to the new patch grid, as "
                                 "transformers interpolates them (e.g. fine-tuning at 384 a model pretrained at 224)")
    output_dir: str | None = arg(None, "where checkpoints, metrics, the export and W&B files go (default: outputs/DATA-MODEL)")
    overwrite_output_dir: bool = train_arg(False, "start over in an output dir that already holds checkpoints")
    resume: str | None = train_arg(None, "auto (newest complete checkpoint in the output dir, or a fresh start) or a checkpoint folder")

    epochs: float = train_arg(3.0, "epochs to train (ignored when --max_steps is set)", within="(0, inf)")
    max_steps: int | None = train_arg(None, "optimizer steps to train", within="[1, inf)")
    micro_batch_size: int | None = arg(None, "images per rank per forward pass (the DALI batch; default 32)",
                                       within="[1, inf)")
    grad_accum: int | None = train_arg(None, "micro batches per optimizer step (default 1)", within="[1, inf)")
    eval_batch_size: int | None = arg(None, "images per rank per eval forward pass (default: the micro batch)",
                                      within="[1, inf)")
    lr: float | None = train_arg(None, "peak learning rate (default 1e-3)", within="[0, inf)")
    weight_decay: float | None = train_arg(None, "AdamW weight decay, not applied to biases and norms (default 0.05)",
                                           within="[0, inf)")
    warmup_steps: int | None = train_arg(None, "linear warmup steps (default: 5%% of the steps)", within="[0, inf)")
    lr_scheduler: str = train_arg("cosine", "decay after warmup (when the DeepSpeed config has no scheduler)",
                                  choices=["cosine", "linear", "constant"])
    layer_decay: float = train_arg(1.0, "layer-wise lr decay (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision, Swin, "
                                   "ConvNeXt, ResNet, RegNet): the head trains at --lr, layer (block) i of L at "
                                   "lr x decay^(L + 1 - i), the embeddings (stem) at lr x decay^(L + 1), as BEiT, MAE "
                                   "and SimMIM fine-tune (e.g. 0.65); 1: off", within="(0, 1]")
    freeze_backbone: bool = train_arg(False, "train the classifier head only, a linear probe of a pretrained --model's "
                                      "features: the rest keeps its weights and runs as in eval (no dropout, BatchNorm "
                                      "statistics kept)")
    ema_decay: float = train_arg(0.0, "keep an exponential moving average of the weights (EMA), updated after every "
                                 "optimizer step with this decay (e.g. 0.9998): evals and the export use it; 0: off",
                                 within="[0, 1)")
    drop_path: float | None = train_arg(None, "stochastic depth rate the model is built with (its config's "
                                        "drop_path_rate: ConvNeXt, Swin, BEiT, DINOv2, ...; e.g. 0.1; default: the "
                                        "config's own)", within="[0, 1)")
    max_grad_norm: float | None = train_arg(None, "gradient clipping (default 1.0; 0 disables)", within="[0, inf)")
    label_smoothing: float = train_arg(0.0, "label smoothing of the cross entropy", within="[0, 1)")
    mixup_alpha: float = train_arg(0.0, "mixup Beta(alpha, alpha); 0 disables", within="[0, inf)")
    cutmix_alpha: float = train_arg(0.0, "cutmix Beta(alpha, alpha); 0 disables (with mixup: one of the two per batch)",
                                    within="[0, inf)")
    random_erase: float = train_arg(0.0, "random erasing: each train image, with this probability (e.g. 0.25), gets a "
                                    "box of 2-33%% of its area, aspect 0.3-3.3, filled with normal noise, as timm's "
                                    "RandomErasing (before mixup/cutmix); 0 disables", within="[0, 1]")
    precision: str = arg("auto", "auto: bf16 where the hardware has it, else fp16 on GPU and fp32 on CPU",
                         choices=["auto", "bf16", "fp16", "fp32"])
    gradient_checkpointing: bool = train_arg(False, "recompute activations in backward to save memory")
    compile: bool = train_arg(False, "torch.compile the model inside the DeepSpeed engine (DeepSpeed's engine.compile)")
    channels_last: bool = arg(False, "channels-last input (faster convolutions on GPU)")
    seed: int = arg(0, "seed of model init, data order and augmentation")

    crop_scale: tuple[float, float] = train_arg((0.08, 1.0), "random-resized-crop area range", nargs=2, type=float,
                                                within="(0, 1]")
    hflip: float = train_arg(0.5, "horizontal flip probability", within="[0, 1]")
    color_jitter: float = train_arg(0.0, "brightness/contrast/saturation jitter strength", within="[0, 1]")
    auto_augment: str | None = train_arg(None, "automatic augmentation", choices=["rand_augment", "trivial_augment"])
    skip_shard_hashes: bool = arg(False, "skip the sha256 check of the shards before training (each rank hashes 1/world of them)")
    eval_resize: str | None = arg(None, "eval resize: dali (in the graph), torch (after decoding), pillow (bit-identical "
                                  "to the HF processor, slower); default torch on CPU, dali on GPU",
                                  choices=["dali", "torch", "pillow"])
    data_threads: int | None = arg(None, "DALI threads per rank (default: this rank's share of the CPU cores; half of "
                                   "it when training on CPU)", within="[1, inf)")
    hw_decoder_load: float | None = arg(None, "GPU: the share of JPEGs for the hardware JPEG decoder (A100, H100, H200 "
                                        "have one), the rest decode in CUDA kernels beside the model (default: "
                                        "DALI's, 0.65)", within="[0, 1]")
    priority_stream: bool = arg(False, "GPU: run the model on a high-priority CUDA stream, so that the GPU schedules its "
                                "kernels ahead of DALI's, which then fill the gaps")
    train_fancy_upsampling: bool = train_arg(False, "GPU: training JPEGs decode with libjpeg-turbo's chroma "
                                             "upsampling, as Pillow and the eval decoder do (nvJPEG's default "
                                             "replicates chroma pixels)")

    eval_only: bool = arg(False, "evaluate --model (a trained model folder) on --eval_split, no training: writes "
                          "eval_results.json, predictions.jsonl and confusion_matrix.png to the output dir")
    labels_by_id: bool = arg(False, "the model's label i is class i of the shards' classes.json, whatever their names "
                             "(a hub ImageNet model, 'tench, Tinca tinca', ..., on shards of synset folders n01440764, "
                             "...): --eval_only evaluates it, and training keeps its head; as many labels as classes")
    eval_split: str = arg("val", "the split every eval runs on (test: the shards of a source's test/ folder)",
                          choices=["val", "test"])
    eval_steps: int | None = train_arg(None, "evaluate every N steps, and at the end (default: every epoch)",
                                       within="[1, inf)")
    save_steps: int | None = train_arg(None, "checkpoint every N steps, and at the end (default: at every eval); 0: no "
                                       "checkpoint and no export (benchmarks, sweeps)", within="[0, inf)")
    save_total_limit: int = train_arg(2, "recent checkpoints to keep, besides the best by top-1", within="[0, inf)")
    export: str = train_arg("best", "checkpoint exported to OUTPUT/model at the end: the best by eval top-1 (the last "
                            "when nothing was evaluated), or the last", choices=["best", "last"])
    log_steps: int = train_arg(10, "log train scalars every N steps", within="[1, inf)")
    wandb_project: str = arg("dali-deepspeed-vision", "W&B project")
    wandb_mode: str | None = arg(None, "default: online when an API key is configured, else offline",
                                 choices=["online", "offline", "disabled"])
    wandb_run_name: str | None = arg(None, "W&B run name (default: the output dir's name)")
    peak_tflops: float | None = arg(None, "the device's dense peak TFLOP/s in the training precision, for perf/mfu "
                                    "(default: from a table of A100, H100, H200, L40S, L4, A10, V100, T4; none on CPU)",
                                    within="(0, inf)")
    baseline_loader: bool = train_arg(False, "train on webdataset + the model's HF image processor in a torch "
                                      "DataLoader (one worker per core), the loader Hugging Face users run today: a "
                                      "benchmark baseline (processor preprocessing only, no augmentation, no exact "
                                      "resume; eval stays on DALI)")
    profile: str | None = train_arg(None, "START:STEPS: a torch.profiler trace of STEPS optimizer steps from step "
                                    "START, every rank, into OUTPUT/profile/ (Chrome trace JSON for Perfetto, and a "
                                    "table of the top operators)")
    synthetic_data: bool = train_arg(False, "train on one fixed batch already on the device (measures the input-bound ceiling)")
    nan_guard: str = train_arg("skip", "skip: each micro batch's loss is checked on every rank before its backward "
                               "and a non-finite one is skipped (one host sync per micro batch); stop: no "
                               "per-micro-batch sync, the losses are checked at every log, eval and checkpoint and "
                               "the run stops at a non-finite one, the checkpoints before it intact",
                               choices=["skip", "stop"])
    max_bad_steps: int = train_arg(5, "--nan_guard skip: stop after this many consecutive skipped steps",
                                   within="[1, inf)")
    peer_timeout: float = arg(60.0, "seconds a rank may go unheard (each is heard from once a second) before rank 0 "
                              "stops every rank, naming it: its process ended or froze, or its node is down, where no "
                              "collective fails (NCCL waits for a dead peer until its own timeout, 10-30 minutes)")
    record_keys: bool = train_arg(False, "write the sample keys each rank trains on, per step, to OUTPUT/sample_keys/ (audits the data order)")
    given: tuple[str, ...] = arg((), "the arguments given on the command line (not a flag: parse_args fills it)", cli=False)


def interval_words(within: str) -> str:
    """"[0, 1)" -> "from 0 to below 1", "[1, inf)" -> "1 or more", "(0, inf)" -> "above 0", ..."""
    low, high = (bound.strip() for bound in within[1:-1].split(","))
    if high == "inf":
        return f"{low} or more" if within[0] == "[" else f"above {low}"
    if within[0] == "(":
        return f"above {low}, " + (f"at most {high}" if within[-1] == "]" else f"below {high}")
    return f"from {low} to {high}" if within[-1] == "]" else f"from {low} to below {high}"


def out_of_range(args: TrainArgs, *, training: bool = True) -> list[str]:
    """Each flag whose value lies outside its field's `within` interval (those that only training
    reads left out when not `training`), e.g. "--micro_batch_size 0: 1 or more"."""
    problems = []
    for f in fields(args):
        within, value = f.metadata["within"], getattr(args, f.name)
        if within is None or value is None or (f.metadata.get("training_only") and not training):
            continue
        low, high = (float(bound) for bound in within[1:-1].split(","))
        for v in value if isinstance(value, tuple) else (value,):
            if not ((low <= v if within[0] == "[" else low < v) and (v <= high if within[-1] == "]" else v < high)):
                shown = " ".join(f"{x:g}" for x in value) if isinstance(value, tuple) else f"{value:g}"
                problems.append(f"--{f.name} {shown}: {interval_words(within)}")
                break
    return problems


def training_only_given(args: TrainArgs) -> list[str]:
    """The flags given on the command line that only training uses (an --eval_only run says so)."""
    return [f"--{f.name}" for f in fields(args) if f.metadata.get("training_only") and f.name in args.given]


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """TrainArgs from the command line (DeepSpeed's launcher adds --local_rank, which is ignored)."""
    parser = argparse.ArgumentParser(prog="deepspeed train/main.py", description="Train a Hugging Face image "
                                     "classifier with DeepSpeed on DALI-fed WebDataset shards.")
    for f in fields(TrainArgs):
        meta, flag = dict(f.metadata), "--" + f.name
        doc, within = meta.pop("doc"), meta.pop("within")
        meta.pop("training_only", None)
        if not meta.pop("cli", True):
            continue
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=doc)
            continue
        kind = {"int | None": int, "float | None": float, "float": float, "int": int}.get(f.type, str)
        shown = "; ".join(([] if f.default in (None, MISSING) else [f"default: {f.default}"])
                          + ([interval_words(within)] if within else []))
        shown = f" ({shown})" if shown else ""
        parser.add_argument(flag, type=meta.pop("type", kind), default=f.default, help=doc + shown, **meta)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    namespace = vars(parser.parse_args(argv))
    namespace.pop("local_rank")
    # what was given, whatever its value: parsed again with every default suppressed
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace["given"] = tuple(sorted(vars(parser.parse_args(argv)).keys() - {"local_rank"}))
    namespace["crop_scale"] = tuple(namespace["crop_scale"])
    return TrainArgs(**namespace)
