"""Where the numbers go: W&B (rank 0) and OUTPUT/metrics.jsonl, the same scalars in both.

Names group on a W&B dashboard: train/ (loss, lr, grad_norm, skipped_steps, overflow_steps,
loss_scale), eval/ (loss, top1, top5; with --ema_decay, of the weight average, and eval_no_ema/ of
the weights as trained), perf/ (images_per_sec, step_time, data_wait_fraction,
gpu_mem, tflops, mfu); every chart's x axis is `trainer/step`, so that a resumed run continues the
dashboard where its checkpoint was. The run's summary (the runs table) also holds the best eval so
far, eval/best_top1 and eval/best_step (the export's, with --export best).
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import socket
import struct
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from train.checkpoint import WriteError, write_atomic, write_failure

STEP = "trainer/step"  # the x axis of every chart


def default_wandb_mode() -> tuple[str, str]:
    """(mode, why): WANDB_MODE if set, online with an API key configured, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "from WANDB_MODE"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online", "an API key is in ~/.netrc"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline", "no W&B API key configured; `wandb sync` uploads it later"


def wandb_unreachable(timeout: float = 5.0) -> str | None:
    """Why W&B's server cannot be reached from this machine (no DNS, no route), or None. A compute
    node without internet, where the API key of the login node is configured, would otherwise wait
    in wandb.init for its 90 s timeout. Not checked through a proxy (W&B goes through it)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import wandb

    url = urllib.parse.urlparse(wandb.setup().settings.base_url)  # as init reads it: env, `wandb login --host`
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


class RunLogger:
    """Logs on rank 0 only; every other rank gets a logger that does nothing. An online run whose
    server cannot be reached logs offline instead (`fallback` says why): the training goes on, and
    `wandb sync` uploads it later."""

    def __init__(self, *, output_dir: Path, enabled: bool, mode: str, project: str, name: str, config: dict,
                 run_id: str | None, resume_step: int | None):
        self.enabled, self.run, self.fallback, self.lost = enabled, None, None, False
        self.relogged: list[int] = []  # the steps of the rows logged again (replay_lost)
        self.path = Path(output_dir) / "metrics.jsonl"
        if not enabled:
            return
        truncate_log(self.path, after=resume_step or 0)
        if mode != "disabled":
            import wandb

            # what the offline run's earlier parts wrote: W&B's process, ended with a preempted job,
            # loses what it had not written yet (a short run's whole history)
            held = wandb_rows(Path(output_dir) / "wandb", run_id) if run_id and mode == "offline" else None
            if mode == "online" and (why := wandb_unreachable()):
                mode, self.fallback = "offline", why
            init = dict(project=project, name=name, dir=str(output_dir), config=config, id=run_id,
                        resume="allow" if run_id else None)
            try:
                self.run = wandb.init(mode=mode, **init)
            except wandb.errors.CommError as e:
                if mode != "online":
                    raise
                self.fallback = str(e).splitlines()[0]
                self.run = wandb.init(mode="offline", **init)
            # Charts follow the trainer's step, not W&B's own: W&B drops `log(step=s)` for an s it has
            # passed, so after a crash at step M and a resume from N < M the values of N+1..M would be
            # the dead run's, and the resumed ones lost
            self.run.define_metric(STEP)
            self.run.define_metric("*", step_metric=STEP)
            if held is not None:
                self.replay_lost(held)

    def replay_lost(self, held: dict[int, set[str]]) -> None:
        """Logs to W&B again the rows of metrics.jsonl (up to the step resumed from) that its earlier
        parts do not hold (`held`: wandb_rows), in their order, on their steps."""
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            row = json.loads(line)
            step = row.pop("step")
            if not set(row) <= held.get(step, set()):
                self._to_wandb(lambda: self.run.log({**row, STEP: step}))
                self.relogged.append(step)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    @property
    def run_name(self) -> str | None:
        return self.run.name if self.run else None

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run else None

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        except OSError as e:
            raise WriteError(f"writing {self.path} failed: {write_failure(e)}") from e
        self._to_wandb(lambda: self.run.log({**scalars, STEP: step}))

    def _to_wandb(self, call) -> None:
        """Makes the W&B `call` unless W&B's process is gone. A job stopped by SIGTERM loses it while
        the ranks save their checkpoint: a scheduler signals every process of the job, and the
        deepspeed launcher ends rank 0's children when it relays a signal or Ctrl-C; the next log
        then failed, and rank 0 with it, so a preempted run saved nothing. The training goes on, and
        so does metrics.jsonl; W&B keeps what it got until then."""
        if not self.run or self.lost:
            return
        try:
            call()
        except ConnectionError:
            self.lost = True
            print(f"\ntrain: W&B's process has ended (signalled with the job?): nothing more goes to W&B, "
                  f"metrics.jsonl has every value; what W&B got is in {Path(self.run.dir).parent}", file=sys.stderr,
                  flush=True)

    def summarize(self, values: dict) -> None:
        """Values of the run as a whole for W&B's summary (the columns of a project's runs table, where
        a chart's value is its last), not charted."""
        self._to_wandb(lambda: self.run.summary.update(values))

    def log_samples(self, step: int, *, images: np.ndarray, true: list[str], predicted: list[str]) -> None:
        """A table of eval images (N,H,W,3 uint8) with their true and predicted labels."""
        if not self.run or self.lost:
            return
        import wandb

        table = wandb.Table(columns=["image", "true", "predicted"])
        for image, t, p in zip(images, true, predicted):
            table.add_data(wandb.Image(image), t, p)
        self._to_wandb(lambda: self.run.log({"eval/samples": table, STEP: step}))

    def log_details(self, step: int, *, results: dict, classes: list[str], true_ids: list[int],
                    predicted_ids: list[int], picture: Path) -> None:
        """The per-class table, the most confused pairs and the confusion matrix (W&B's own chart
        up to 50 classes, the picture of train/evaluation.py always)."""
        if not self.run or self.lost:
            return
        import wandb

        per_class = wandb.Table(columns=["class", "samples", "top1", "predicted"],
                                data=[[name, v["samples"], v["top1"], v["predicted"]]
                                      for name, v in results["per_class"].items()])
        confused = wandb.Table(columns=["true", "predicted", "count", "share_of_true"],
                               data=[[c["true"], c["predicted"], c["count"], c["share_of_true"]]
                                     for c in results["most_confused"]])
        logged = {"eval/per_class": per_class, "eval/most_confused": confused,
                  "eval/confusion_matrix_image": wandb.Image(str(picture)), STEP: step}
        if len(classes) <= 50:
            logged["eval/confusion_matrix"] = wandb.plot.confusion_matrix(y_true=true_ids, preds=predicted_ids,
                                                                          class_names=classes)
        self._to_wandb(lambda: self.run.log(logged))

    def finish(self) -> None:
        """Closes the run and W&B's service process (now, not at exit, where a failure would be a
        traceback). The launcher ends every process of a job that failed, W&B's too: what was
        logged until then stays in the run's folder."""
        if self.run:
            try:
                if not self.lost:  # (said already)
                    self.run.finish()
            except ConnectionError:
                print(f"train: W&B's process ended before the run was closed; what it logged until then is in "
                      f"{Path(self.run.dir).parent}", file=sys.stderr, flush=True)
            teardown_wandb()


def teardown_wandb() -> None:
    """Ends W&B's service process if this process started one; its own teardown at exit would print
    a traceback when the process is gone already (ended with the job's signal)."""
    if "wandb" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["wandb"].teardown()


def wandb_records(run_file: Path):
    """The protobuf records of a W&B run file (run-ID.wandb: a LevelDB-style log of 32 KiB blocks
    with 7-byte record headers; wandb has no reader for it), up to a record cut short (its process
    ended while writing)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    raw, pos, chunk, block = run_file.read_bytes(), 7, b"", 32768
    if raw[:4] != b":W&B":
        return
    while pos + 7 <= len(raw):
        if (left := block - pos % block) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(raw):
            return
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(chunk)
            except DecodeError:
                return
            chunk = b""
            yield record


def history_row(record) -> dict[str, str]:
    """{name: value as JSON} of a W&B history record (a row that `run.log` logged)."""
    return {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}


def wandb_rows(folder: Path, run_id: str) -> dict[int, set[str]]:
    """{trainer step: the names logged at it} in the offline W&B runs of `run_id` in `folder`
    (OUTPUT/wandb): what `wandb sync` uploads of them."""
    held: dict[int, set[str]] = {}
    for run_file in sorted(folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(run_file):
            if record.WhichOneof("record_type") == "history":
                row = history_row(record)
                if STEP in row:
                    held.setdefault(int(json.loads(row[STEP])), set()).update(row)
    return held


def truncate_log(path: Path, *, after: int) -> None:
    """Drops the lines of a per-step JSONL log whose step is past `after` (what a resumed run will
    log again), so the log has no gap and no duplicate step; `after=0` empties it."""
    if path.exists():
        write_atomic(path, "".join(line + "\n" for line in split_log(path, at=after)[0]))


def split_log(path: Path, *, at: int) -> tuple[list[str], list[str]]:
    """(the lines of a per-step JSONL log up to step `at`, the lines past it)."""
    lines = path.read_text().splitlines() if path.exists() else []
    past = [json.loads(line)["step"] > at for line in lines]
    return [l for l, p in zip(lines, past) if not p], [l for l, p in zip(lines, past) if p]


def viewable(pixel_values: torch.Tensor, *, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalized (N,3,H,W) pixels back to (N,H,W,3) uint8 for looking at."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    pixels = pixel_values.detach().float().cpu() * std_t + mean_t
    return pixels.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
