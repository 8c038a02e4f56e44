"""Run by tests/test_pipelines.py under the real launcher: each rank writes what it saw, per epoch
of the train loader and per pass of the eval loader."""

import json
import os
import sys

from pipelines.loader import create_loader
from pipelines.spec import spec_from_processor
from transformers import ViTImageProcessorPil

data, out, batch_size, epochs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
spec = spec_from_processor(ViTImageProcessorPil(size={"height": 16, "width": 16}))
seen = {}
for split, train in (("train", True), ("val", False)):
    loader = create_loader(data=data, split=split, spec=spec, batch_size=int(batch_size), train=train,
                           rank=rank, world_size=world, device="cpu", num_threads=1)
    seen[split] = []
    for _ in range(int(epochs)):
        batches = list(loader)
        seen[split].append({
            "steps": len(batches),
            "len": len(loader),
            "sizes": [len(b["keys"]) for b in batches],
            "samples": [[k, int(label)] for b in batches for k, label, m in zip(b["keys"], b["labels"], b["mask"]) if m],
        })
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(seen, f)
