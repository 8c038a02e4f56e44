"""The job's processes: the process group, agreement between ranks, SIGTERM, and a rank's peers.

A rank never leaves its peers waiting: problems are agreed by every rank before anyone stops
(`agree`), a rank that fails alone tells the others through the job's store (`PeerWatch`), and
SIGTERM or Ctrl-C outside the training loop unwinds the rank (`watch_sigterm`) instead of killing
it with locks held.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NoReturn

import deepspeed
import psutil
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from train.perf import release_build_locks


class Terminated(BaseException):
    """SIGTERM or Ctrl-C (SIGINT) outside the training loop (which saves on either: Preemption),
    raised in the main thread; `signum` says which."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum

    @property
    def how(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

    def __str__(self) -> str:
        return f"stopped by {self.how}"


class Interrupted(BaseException):
    """A second Ctrl-C in the training loop, after the first asked for a checkpoint and a stop: stop
    now, without saving."""


LOOP_SAVES = threading.Event()  # set while Preemption handles SIGTERM: saving takes as long as it takes
SIGTERM_GRACE_S = 5.0


def watch_sigterm() -> None:
    """SIGTERM outside the training loop raises Terminated in the main thread, which unwinds: what
    the rank holds is released on the way out (a rank killed by the signal's default action while
    DeepSpeed builds or loads an op leaves torch's build lock, and every later run waits for it).
    So does Ctrl-C (SIGINT: a terminal sends it to every process of the job), unless the rank was
    started with it ignored (a background job). A main thread blocked in C++ (a store, a
    collective) runs no Python handler, so a thread woken by the signal (the wakeup fd) ends the
    rank SIGTERM_GRACE_S later, as the default action would."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _terminated)

    def watch():
        while not (got := {signal.SIGTERM, signal.SIGINT} & set(os.read(read, 64))) or LOOP_SAVES.is_set():
            pass
        time.sleep(SIGTERM_GRACE_S)
        release_build_locks()  # os._exit skips every finally
        how = Terminated(max(got))
        print(f"train: rank {os.environ.get('RANK', 0)}: {how.how} while blocked outside Python; exiting",
              file=sys.stderr, flush=True)
        os._exit(128 + how.signum)

    threading.Thread(target=watch, daemon=True, name="sigterm-watch").start()


def exit_rank(code: int) -> NoReturn:
    """Ends this rank with `code`, which nothing in the interpreter's teardown can change. A daemon
    thread of any library (a store call, a DALI or W&B thread) that comes back from torch's C++
    while the interpreter shuts down aborts the process ("terminate called without an active
    exception": pybind11's GIL guard unwinds through pthread_exit, pytorch/pytorch#38228), and so
    does a C++ static destroyed with its thread still running; through the launcher, a config
    error (2) then reads 250. What a normal exit does first is done here too: other threads joined,
    atexit handlers run (W&B, logging, temp dirs, compile workers), output flushed; then the
    process ends without tearing the interpreter down."""
    threading._shutdown()  # what exit runs first: thread pools told to stop, other threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def hold_sigterm() -> None:
    """On the way out after a failure, SIGTERM no longer raises Terminated: the rank names the cause
    first. A launcher signals the other ranks as soon as it sees one die (torchrun within 0.1 s),
    while they may still be finding which; before, such a rank said it was stopped by SIGTERM with
    nothing saved. The SIGTERM watcher still ends a rank blocked past SIGTERM_GRACE_S."""
    signal.signal(signal.SIGTERM, _held)


def _held(signum, frame):
    pass  # the signal's byte on the wakeup fd starts the watcher's grace


def _terminated(signum, frame):
    # the launcher relays a second one, or SIGTERM after a Ctrl-C: the way out is not cut short. A
    # handler that does nothing, not SIG_IGN: one already on its way would raise "OSError: Signal 15
    # ignored due to race condition" wherever the rank is then
    signal.signal(signal.SIGTERM, _held)
    if signal.getsignal(signal.SIGINT) is _terminated:
        signal.signal(signal.SIGINT, _held)
    raise Terminated(signum)


@contextlib.contextmanager
def distributed():
    """This process's group (the deepspeed launcher's ranks, or a world of one), torn down on every
    exit: C++ communication threads left running abort the process at shutdown."""
    _init_distributed()
    try:
        yield
    finally:
        dist.destroy_process_group()


def srun_env(environ) -> dict[str, str] | None:
    """The launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and LOCAL_SIZE,
    MASTER_ADDR and MASTER_PORT) of a task that `srun` started, one of a step of several tasks,
    from SLURM's (its SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the tasks of its node,
    the first node of the step); the rendezvous port from the job and step ids unless MASTER_PORT is set. None where a
    launcher set RANK (`srun deepspeed ...`, `srun torchrun ...`), outside a step (a batch script:
    SLURM_PROCID but no step) and for a step of one task."""
    step = _slurm_step(environ)[1] or ""
    world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if ("RANK" in environ or "SLURM_PROCID" not in environ or world < 2
            or not step.isdigit() or int(step) >= SLURM_SPECIAL_STEPS):  # the batch script's, the extern step
        return None
    node = int(environ.get("SLURM_NODEID", 0))
    per_node = _per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1")
    on_node = (len(environ["SLURM_GTIDS"].split(",")) if environ.get("SLURM_GTIDS") else
               per_node[min(node, len(per_node) - 1)])
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(on_node), "LOCAL_SIZE": str(on_node),  # (DeepSpeed's CPU all-reduce reads it)
            "MASTER_ADDR": environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + _digits(environ.get("SLURM_JOB_ID")) % 1000 * 10
                                                               + int(step) % 10)}


def _digits(text: str | None) -> int:
    return int(re.sub(r"\D", "", text or "") or 0)


SLURM_SPECIAL_STEPS = 0xFFFFFFF0  # from here up, step ids of SLURM's own steps (batch 0xFFFFFFFE, extern ...)


def _slurm_step(environ) -> tuple[str | None, str | None]:
    """(job id, step id) of a SLURM task's environment (older SLURM: SLURM_STEPID)."""
    return environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))


def _per_node(tasks: str) -> list[int]:
    """SLURM's tasks per node, "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in tasks.split(","):
        count, _, times = part.partition("(x")
        counts += [int(count)] * int(times.rstrip(")") or 1)
    return counts


def first_host(nodes: str) -> str:
    """The first host of a SLURM host list: "gpu[007-009,012],cpu1" -> "gpu007"."""
    prefix, _, rest = nodes.partition("[")
    if "," in prefix or not rest:  # "a1,a2" or a single name
        return prefix.split(",")[0]
    ranges, _, suffix = rest.partition("]")
    return prefix + ranges.split(",")[0].split("-")[0] + suffix.split(",")[0]


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "remote process exited",
             "communicator was aborted")


def lost_peer(error: BaseException) -> bool:
    """Whether an error is a collective's that lost a peer (gloo's connection reset, NCCL's remote
    error, torch's DistError), a symptom of another rank's end rather than this rank's own failure."""
    return isinstance(error, dist.DistError) or any(text in str(error) for text in LOST_PEER)


class PeerWatch:
    """Stops this rank promptly when another rank failed. A rank that fails alone (a bad sample,
    an exception) leaves its peers waiting in a collective until the backend's timeout, and a
    launcher on another node never hears of it; so it posts the reason in the job's store (the
    rendezvous every rank reaches) and every rank polls it once a second. A rank that stops counts
    itself out and waits for the others (LINGER_S at most) before it exits: every rank reads the
    reason (rank 0 hosts the store) and cleans up before the launcher ends them all. A rank killed
    outright posts nothing: the ranks of its node find it among their launcher's children; and each
    watcher beats in the store once a poll, so rank 0 finds a rank that nobody has heard from for
    `silent_s` (its node down, or the rank killed alone there); and a rank whose store calls do not
    come back for `silent_s` ends (rank 0 froze, or its node is down)."""

    KEY = "dali-deepspeed-vision/stop"
    LOST = "lost contact with rank 0 (it exited or its node went down)"
    LEAVE_S = 10.0  # how long a rank waits for the watcher's store call in flight (rank 0 answers in ms)
    LINGER_S = 5.0  # how long a stopping rank waits for the others (each polls once a second)
    ROLL_S = 2.5  # how long the first to fail waits for every other rank to answer its stop
    LEAST_SILENT_S = 10.0  # the shortest silence taken for a rank's end (a busy machine pauses processes)

    def __init__(self, rank: int, store=None, poll_s: float = 1.0, world: int | None = None, silent_s: float = 60.0):
        self.rank, self.done, self.poll_s, self.silent_s = rank, threading.Event(), poll_s, silent_s
        self.world = world or (dist.get_world_size() if dist.is_initialized() else 1)
        self.store = _TimedStore(store or dist.distributed_c10d._get_default_store())
        self.first: dict | None = None  # the stop the first rank to fail posted, once this one reads it
        self.stopping = False
        self.local = _local_peers() if self.world > 1 else {}
        self.dead: list[int] = []  # this node's ranks found ended (`ended`), counted out by the first to fail
        self.where: Callable[[], str] = lambda: ""  # where the run is ("at step 3"), set by the trainer
        self.kept: Callable[[], str] | None = None  # what the run leaves to go on from, said by the first to stop
        self.heard: dict[int, tuple[int, float]] = {}  # rank 0: each rank's last beat, and since when
        self.next_roll = time.monotonic()
        if self.world > 1:  # where this rank runs, for rank 0 to name it
            self.store.set(f"{self.KEY}/host/{rank}", socket.gethostname())
        self.thread = threading.Thread(target=self._watch, daemon=True, name="peer-watch")
        self.thread.start()
        if self.world > 1 and rank != 0:
            threading.Thread(target=self._guard, daemon=True, name="store-guard").start()

    def stop_all(self, code: int, reason: str) -> bool:
        """Tells every other rank to stop; whether this rank was the first to fail (or cannot know).
        When not, `first` holds the stop the first posted; when the store is gone, that contact
        with rank 0 was lost. The rank then cleans up and `leave`s: from here on the launcher's
        SIGTERM (to every rank once one has exited; SIGKILL 30 s later) cuts neither short."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._leave()
        self.stopping = True
        if 0 in self.dead:  # found dead on this node, with the store: each survivor here says so alike
            self.store = None
            return True
        try:
            if self.store.add(f"{self.KEY}/failed", 1) > 1:
                self._answer()
                self.store.wait([self.KEY], datetime.timedelta(seconds=self.LINGER_S))  # posted right after
                self.first = json.loads(self.store.get(self.KEY))
                return False
            self.store.set(self.KEY, json.dumps({"code": code, "reason": reason}))
            for rank in self.dead:  # the first to fail found them ended (no other rank had stopped yet)
                self.store.add(f"{self.KEY}/left", 1)
                self.store.add(f"{self.KEY}/gone", int(rank != 0))
        except Exception:  # the store is gone (rank 0 exited): the peers see that too
            self.first, self.store = {"code": 1, "reason": self._lost()}, None
        return True

    def ended(self, where: str = "") -> str | None:
        """Which of this node's other ranks have ended, how and `where` this rank noticed (a rank
        killed outright, by the OOM killer, says nothing itself: its peers' collectives just lose
        it); None while all run."""
        how = self._ended_here()
        self.dead = list(how)
        return self._describe(how, where) if how else None

    def _ended_here(self) -> dict[int, str]:
        how = {rank: how for rank, process in sorted(self.local.items()) if (how := _how_ended(process))}
        # a rank that exited with a code said why itself (one that stopped after the death); a signal's is the cause
        return {r: h for r, h in how.items() if "killed" in h} or {r: h for r, h in how.items() if "exited" not in h}

    def say_stopping(self, here: str | None) -> int:
        """After stop_all: prints why this rank stops and returns its exit code. The first rank's
        reason, with what this rank found `here` (its error, or a rank of its node found dead) unless
        that reason names it already; when this rank was the first, `here` is a rank of its node found
        dead, said with what the run leaves to go on from. When rank 0 died, with the store, every
        survivor of its node is a first, or finds the store gone: the lowest of them says that."""
        if self.first is not None:
            named = self.dead and all(f"rank {rank}'s process" in self.first["reason"] for rank in self.dead)
            self.say(f"stopping: {self.first['reason']}" + ("" if named or not here else f" (here then: {here})"),
                     kept=0 in self.dead and self.speaks_for_node())
            return self.first["code"]
        self.say(f"stopping: {here}", kept=0 not in self.dead or self.speaks_for_node())
        return 1

    def say(self, line: str, *, kept: bool = False) -> None:
        if kept and self.kept:
            line += f"\ntrain: {self.kept()}"
        print(f"train: rank {self.rank}: {line}", file=sys.stderr, flush=True)

    def await_reason(self) -> None:
        """Before a rank whose collective lost a peer, with none of its node found ended, posts that
        error: the lost peer's own node may name it a moment later (its ranks find it ended), and
        the first reason posted is the one every rank repeats; ROLL_S at most."""
        with contextlib.suppress(Exception):
            deadline = time.monotonic() + self.ROLL_S
            while self.world > 1 and not self.store.check([self.KEY]) and time.monotonic() < deadline:
                time.sleep(0.05)

    def silent(self) -> list[int]:
        """For the first rank to fail, after its post: the ranks that did not answer it within
        ROLL_S, but for those found dead here (each answers as it reads the post, within a poll):
        ended or hung, on another node (a rank killed there posts nothing)."""
        others = [f"{self.KEY}/here/{rank}" for rank in range(self.world) if rank not in {self.rank, *self.dead}]
        if self.store is None or not others:
            return []
        with contextlib.suppress(Exception):
            deadline = time.monotonic() + self.ROLL_S
            while not self.store.check(others) and time.monotonic() < deadline:
                time.sleep(0.05)
            return [int(key.rsplit("/", 1)[1]) for key in others if not self.store.check([key])]
        return []

    def speaks_for_node(self) -> bool:
        """Whether this rank is the lowest of its node's ranks but rank 0 (which is gone: `ended`)."""
        return self.rank == min((set(self.local) - {0}) | {self.rank})

    def _answer(self) -> None:
        self.store.set(f"{self.KEY}/here/{self.rank}", "")

    def _lost(self) -> str:
        """Why the store is gone: rank 0 (which hosts it) found ended on this node, or not here."""
        how = _how_ended(self.local[0]) if 0 in self.local else None
        if how:
            self.dead = sorted({*self.dead, 0})
        return f"lost contact with rank 0: {self._describe({0: how})}" if how else self.LOST

    def _describe(self, how: dict[int, str], where: str = "") -> str:
        ended = "; ".join(f"rank {rank}'s process (pid {self.local[rank].pid}) {what}" for rank, what in how.items())
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL: `dmesg` on this node)"
        return ended + (f" {where}" if where else "") + (hint if "SIGKILL" in ended else "")

    def leave(self) -> None:
        """After stop_all and this rank's cleanup (W&B): it counts itself out and waits until every
        rank has (LINGER_S at most). The launcher ends every rank, and their W&B processes, as soon
        as one exits with an error; so none exits before the others are done and have read why."""
        if self.stopping:
            self._count_out()

    def close(self) -> None:
        """Every rank finished together: rank 0 (which hosts the store) may now exit first. It says so
        in the store first: the ranks of its node that find it ended then know it was not killed."""
        with contextlib.suppress(Exception):
            self.store.set(f"{self.KEY}/closed/{self.rank}", "")
        self._leave()

    def _leave(self) -> None:
        """The watcher ends, its store call in flight done first (a daemon thread that comes back from
        torch's C++ while the interpreter shuts down aborts the process; exit_rank ends a rank of
        train/main.py without that teardown, whatever other threads are in flight)."""
        self.done.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(self.LEAVE_S)

    def _count_out(self) -> None:
        """This rank stops: it counts itself out and waits until all have (LINGER_S at most); rank 0,
        which hosts the store, then until every other rank has made its last store call."""
        if self.store is None:  # gone with rank 0: nothing to wait for
            return
        with contextlib.suppress(Exception):
            deadline = time.monotonic() + self.LINGER_S
            self._wait_for("left", 1, self.world, deadline)
            if self.rank == 0:
                self._wait_for("gone", 0, self.world - 1, deadline)
            else:
                self.store.add(f"{self.KEY}/gone", 1)

    def _wait_for(self, key: str, add: int, count: int, deadline: float) -> None:
        done = self.store.add(f"{self.KEY}/{key}", add)
        while done < count and time.monotonic() < deadline:
            time.sleep(0.05)
            done = self.store.add(f"{self.KEY}/{key}", 0)

    def _watch(self) -> None:
        while not self.done.wait(self.poll_s):
            try:
                posted = self.store.check([self.KEY])
                if not posted and self.world > 1:
                    self.store.add(f"{self.KEY}/beat/{self.rank}", 1)
                dead = {} if posted else self._killed_here()
                unheard = [] if posted or dead else self._unheard()
                if posted:
                    self.first = json.loads(self.store.get(self.KEY))
                    self._answer()
                    here = self.ended()  # a rank of this node that died, when another rank posted first
            except Exception:  # the store lives in rank 0's process
                if self.done.is_set():
                    return
                posted, self.first, here = True, {"code": 1, "reason": self._lost()}, None
            if posted:
                self._exit(self.say_stopping(here))
            if dead and not self.done.is_set():
                self._stop_for_dead(dead)
            if unheard and not self.done.is_set():
                self._stop_for_unheard(unheard)

    def _killed_here(self) -> dict[int, str]:
        """This node's ranks that ended without closing (`close`), how."""
        how = self._ended_here() if self.local else {}
        return {rank: what for rank, what in how.items() if not self._closed(rank)}

    def _closed(self, rank: int) -> bool:
        return self.store.check([f"{self.KEY}/closed/{rank}"])

    def _at(self) -> str:
        return f" {where}" if (where := self.where()) else ""

    def _unheard(self) -> list[int]:
        """Rank 0, every tenth of `silent_s`: the ranks whose watcher has not beaten for `silent_s`
        but those that closed: their process ended or is frozen, or their node is down (a rank
        killed alone on its node: no collective fails under NCCL, and its launcher tells no other
        node)."""
        now = time.monotonic()
        if self.rank != 0 or now < self.next_roll:
            return []
        self.next_roll = now + max(self.poll_s, self.silent_s / 10)
        for rank in range(1, self.world):
            beat = self.store.add(f"{self.KEY}/beat/{rank}", 0)
            if self.heard.get(rank, (None,))[0] != beat:
                self.heard[rank] = (beat, now)
        late = [rank for rank, (_, since) in self.heard.items() if now - since > self.silent_s]
        return [rank for rank in late if not self._closed(rank)]

    def _stop_for_unheard(self, ranks: list[int]) -> NoReturn:
        """Rank 0 stops every rank for `ranks` (`_unheard`), naming them and the hosts they ran on."""
        hosts = {rank: self.store.get(f"{self.KEY}/host/{rank}").decode() if self.store.check(
            [f"{self.KEY}/host/{rank}"]) else "?" for rank in ranks}
        self._stop_first(ranks, ", ".join(f"rank {rank} (on {host})" for rank, host in hosts.items())
                         + f" not heard from for {self.silent_s:g} s{self._at()}: ended, frozen, or its node is down "
                           "(killed by the OOM killer? that node's log and `dmesg` say)")

    def _stop_for_dead(self, how: dict[int, str]) -> NoReturn:
        """A rank of this node ended, not closed, while no rank had failed: killed outright. Under
        NCCL the others' collectives may wait for it until their timeout instead of failing (GPUs of
        one node talk through memory, not sockets), and the launcher of another node never hears of
        it; so this rank stops every rank as the first to fail would, whatever its main thread waits
        in."""
        self._stop_first(list(how), self._describe(how, self.where()))

    def _stop_first(self, dead: list[int], reason: str) -> NoReturn:
        """Stops every rank for the `dead` ranks (counted out: the others need not wait for them)."""
        self.dead = dead
        self.stop_all(1, reason)
        self._exit(self.say_stopping(reason))

    def _guard(self) -> None:
        """Ends this rank when a store call has not come back for `silent_s`: rank 0, which hosts the
        store, froze or its node went down (its sockets do not close, so no call fails; a TCPStore
        client's timeout does not bound them). Each rank ends so alone: the store is out of reach."""
        while True:
            time.sleep(self.poll_s)
            since = getattr(self.store, "since", lambda: None)()
            if since is not None and time.monotonic() - since > self.silent_s:
                self.say(f"stopping: lost contact with rank 0: the job's store (on {os.environ.get('MASTER_ADDR')}) "
                         f"has not answered for {self.silent_s:g} s{self._at()}: rank 0 froze, or its node is down")
                release_build_locks()
                os._exit(1)

    def _exit(self, code: int) -> NoReturn:
        self._count_out()  # the launcher ends the others once this rank exits
        release_build_locks()  # os._exit skips every finally
        os._exit(code)


class _TimedStore:
    """A store whose calls in flight are known with when they began (PeerWatch._guard)."""

    def __init__(self, store):
        self.store, self.calls = store, {}

    def since(self) -> float | None:
        """When the oldest call in flight began; None when none is."""
        return min(tuple(self.calls.values()), default=None)  # (a copy: other threads add and remove)

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def timed(*args, **kwargs):
            self.calls[threading.get_ident()] = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                self.calls.pop(threading.get_ident(), None)
        return timed


def _local_peers() -> dict[int, psutil.Process]:
    """This node's other ranks of this job by rank: the launcher's other children (deepspeed's
    launch.py, torchrun; srun's step daemon), told apart by the RANK and rendezvous their
    environment holds (srun's tasks: their SLURM_PROCID, job and step)."""
    peers = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(os.getppid()).children():
            with contextlib.suppress(psutil.Error, ValueError):
                rank = _rank_in_job(child.environ())
                if child.pid != os.getpid() and rank is not None:
                    peers[rank] = child
    return peers


def _rank_in_job(env: dict) -> int | None:
    """The rank of the process that `env` (its environment as started) belongs to, if of this job."""
    if _SRUN_STEP:
        return int(env["SLURM_PROCID"]) if _slurm_step(env) == _SRUN_STEP and "SLURM_PROCID" in env else None
    job = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    return int(env["RANK"]) if "RANK" in env and all(env.get(k) == v for k, v in job.items()) else None


_SRUN_STEP: tuple[str | None, str | None] | None = None  # (job id, step id) of a task that srun started


PF_EXITING = 0x4  # a task's flag from the start of its exit (linux/sched.h), before its sockets close


def _how_ended(process: psutil.Process) -> str | None:
    """How a process ended ("was killed by SIGKILL", "exited with 3"); None while it runs. A peer's
    collective loses it as its exit closes its sockets, a moment before it is a zombie that keeps
    its wait status (/proc/PID/stat, field 52) until its launcher reaps it: an exiting process is
    waited for (2 s at most)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            if not process.is_running():  # its pid is another process's by now
                return "has ended"
            stat = Path(f"/proc/{process.pid}/stat").read_text()
            state, _, _, _, _, _, flags, *rest = stat[stat.rindex(")") + 2:].split()
        except (psutil.Error, OSError, ValueError):
            return "has ended"  # reaped already: how is the launcher's to say
        if state == "Z" and len(rest) > 42:
            status = int(rest[42])
            if os.WIFSIGNALED(status):
                return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            return f"exited with {os.WEXITSTATUS(status)}"
        if not int(flags) & PF_EXITING:
            return None
        if time.monotonic() > deadline:
            return "is exiting"
        time.sleep(0.02)


def deepspeed_runner() -> tuple[psutil.Process, int] | None:
    """This rank's launcher (deepspeed's launch.py) and the pid of the `deepspeed` runner that
    started it, when this node's job was started so; None otherwise (torchrun, pdsh: they relay
    SIGTERM themselves)."""
    with contextlib.suppress(psutil.Error):
        launcher = psutil.Process(os.getppid())
        runner = launcher.parent()
        if runner and "deepspeed.launcher.launch" in launcher.cmdline() and any(
                Path(part).name == "deepspeed" or part == "deepspeed.launcher.runner" for part in runner.cmdline()[:3]):
            return launcher, runner.pid
    return None


def _init_distributed() -> None:
    """Under the deepspeed launcher or torchrun the env holds rank and world; under srun, SLURM's
    (`srun_env`); run directly, a world of one."""
    global _SRUN_STEP
    if launched := srun_env(os.environ):
        os.environ.update(launched)
        _SRUN_STEP = _slurm_step(os.environ)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    no_shm_op()
    try:
        deepspeed.init_distributed(verbose=False)
    except dist.DistError as e:
        if not (why := rendezvous_failure(e)):
            raise
        print(f"train: rank {os.environ['RANK']}: {why}", file=sys.stderr, flush=True)
        sys.exit(2)


def no_shm_op() -> None:
    """Before `deepspeed.init_distributed` on CPU ranks: DeepSpeed's CPU accelerator compiles a
    shared-memory all-reduce op on a machine's first job (46 s on 2 idle cores) that only its
    inference all-reduce uses (training's collectives are gloo's), and each rank's 66 MB buffer of
    it in /dev/shm outlived every killed job. It is marked unbuildable, as DeepSpeed's own probe
    marks an op a machine cannot build."""
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rendezvous_failure(error: Exception) -> str | None:
    """What a failed rendezvous (the store at MASTER_ADDR:MASTER_PORT that every rank meets at)
    means, in one line; None for another error. Rank 0 hosts the store and waits for every rank
    (DEEPSPEED_TIMEOUT minutes, 10 by default); the others wait as long to reach it."""
    where, text = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", str(error)
    if "EADDRINUSE" in text:
        return (f"the rendezvous port {os.environ.get('MASTER_PORT')} is taken on {os.environ.get('MASTER_ADDR')} "
                f"(another job?): give this job one of its own, `deepspeed --master_port N ...` (torchrun: "
                f"--master_port N; srun: MASTER_PORT=N)")
    if joined := re.search(r"after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined", text):
        return (f"only {joined[2]} of the job's {joined[3]} ranks reached its rendezvous at {where} within "
                f"{joined[1]} s: the others did not start (their node's launcher log says why), or started with "
                f"another --master_addr or --master_port (every node's must be the same); DEEPSPEED_TIMEOUT=MINUTES "
                f"waits longer")
    if waited := re.search(r"after (\d+)ms while trying to connect", text):
        return (f"rank 0 could not be reached at {where}, the job's rendezvous, within {int(waited[1]) / 1000:g} s: "
                f"it did not start (its node's launcher log says why), or {os.environ.get('MASTER_ADDR')} is not "
                f"its node's address from here (--master_addr)")
    return None


def agree(problems: list[str]) -> None:
    """Every rank gets every rank's problems, so that all stop together and rank 0 prints them all."""
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, problems)
    problems[:] = list(dict.fromkeys(p for rank_problems in gathered for p in rank_problems))


FEW_CORES = 4  # a GPU rank's DALI threads and training loop on fewer cores than this may keep its GPU waiting


def few_cores(device_type: str, *, mine: int | None = None, node: int | None = None) -> str | None:
    """Why a GPU rank may wait for data: its process may run on fewer than FEW_CORES of the node's
    cores (srun binds a task to one CPU unless --cpus-per-task says more), or None."""
    mine = len(os.sched_getaffinity(0)) if mine is None else mine
    node = (os.cpu_count() or 1) if node is None else node
    if device_type != "cuda" or mine >= FEW_CORES or mine >= node:
        return None
    return (f"this rank may run on {mine} of the node's {node} CPU cores (its affinity): DALI's threads and the "
            f"training loop share them, and the GPU may wait for data (perf/data_wait_fraction); under srun, give "
            f"each task cores with --cpus-per-task")


def cpu_share() -> int:
    """This rank's cores: its node's (as far as it may run on them) over the node's ranks; a task
    that srun bound to its own --cpus-per-task has them already."""
    cores = len(os.sched_getaffinity(0))
    if _SRUN_STEP and cores <= int(os.environ.get("SLURM_CPUS_PER_TASK") or 0):
        return cores
    local_world = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cores // local_world)
