"""A trainer checkpoint as a `save_pretrained` folder: fp32 weights consolidated from ZeRO, the
config with id2label, the image processor. Loads in `transformers.pipeline` and in
`train/main.py --model OUT` (for example to go on with another number of ranks).

    python tools/export_checkpoint.py OUTPUT/checkpoints/step-00001000 OUT [--trained_weights]

A checkpoint of a run with --ema_decay exports its weight average, as the run's own export does;
--trained_weights exports the weights as trained instead. A --freeze_backbone run in bf16/fp16
exports its backbone in fp32 as loaded (OUTPUT/model_files/frozen.safetensors), as its own export does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor

from train.checkpoint import FROZEN_FILE, MARKER, MODEL_FILES, any_damage, export_model, not_a_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder (OUTPUT/checkpoints/step-N)")
    parser.add_argument("out", type=Path, help="the model folder to write")
    parser.add_argument("--trained_weights", action="store_true",
                        help="the weights as trained, not the checkpoint's weight average (--ema_decay)")
    args = parser.parse_args(argv)
    files = args.checkpoint.resolve().parent.parent / MODEL_FILES
    if not (args.checkpoint / MARKER).is_file():
        print(f"export_checkpoint: error: {not_a_checkpoint(args.checkpoint)}", file=sys.stderr)
        return 2
    if why := any_damage(args.checkpoint):
        print(f"export_checkpoint: error: {args.checkpoint} is damaged: {why}", file=sys.stderr)
        return 2
    if not files.is_dir():
        print(f"export_checkpoint: error: {files} not found: the run's model config is kept there", file=sys.stderr)
        return 2
    notes = export_model(checkpoint=args.checkpoint, config=AutoConfig.from_pretrained(files),
                         processor=AutoImageProcessor.from_pretrained(files), out=args.out,
                         average=not args.trained_weights, frozen=files / FROZEN_FILE)
    print(f"{args.out}: exported from {args.checkpoint}" + (f" ({', '.join(notes)})" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
