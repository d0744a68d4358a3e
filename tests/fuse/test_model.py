"""Model-based test of the filesystem as applications see it, with and without faults.

Hypothesis runs random sequences of file operations from three processes — two on mount A,
one on mount B (a second daemon on the same directory, as on another node) — against a real
cluster, while a fourth process keeps stat'ing, reading and listing everything on mount A, and applies each operation to a local directory, the model, with the very same
system calls (tests/fuse/fsactor.py). Every answer must match the model: the same bytes,
sizes, listings and errno names.

With faults, a worker or the master is SIGKILLed and restarted at a random moment while the
operations go on, or mount A's daemon is SIGKILLed and mounted again, or SIGKILLed and
taken over by a new daemon on the same connection (open handles stay open, and the writes
they had made are replayed from the journal: nothing acknowledged fails). Then:
- an acknowledged change holds: whatever close or fsync acknowledged is read back exactly,
  also after every process of the cluster and both daemons are killed at the end of a case;
- a file whose writes failed, or whose daemon died with its handles open, reads back as a
  state it went through since its last acknowledged point, byte for byte (every written
  byte is non-zero, so zeros where the model has data are caught);
- a failed namespace call leaves the names as they were before it, or (only when the
  cluster went away under it, an outcome the caller cannot know) as after it.

`FUSECSI_MODEL_EXAMPLES` / `FUSECSI_MODEL_STEPS` make it run long; pytest's
`--hypothesis-seed N` picks the seed. CI runs a few examples of each.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest
from fsactor import Actor, ActorProcess, pack, unpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from support.mounts import KeptMount, Mount, mkdirs, run_cluster

from fusecsi.cluster.local import LocalCluster

EXAMPLES = int(os.environ.get("FUSECSI_MODEL_EXAMPLES", "0"))
STEPS = int(os.environ.get("FUSECSI_MODEL_STEPS", "50"))
BLOCK = 128 << 10  # small blocks: writes cross block boundaries
NAMES = ["a", "b", "c", "s/a", "s/b"]
DIRS = [".", "s"]
FLAGS = ["r", "w", "a", "rw"]
# what a call may answer while a process of the cluster is down or just came back
FAULT_ERRNOS = {"EIO", "ENOTCONN", "ETIMEDOUT", "ECONNABORTED", "ECONNREFUSED", "EAGAIN"}
CALL_TIMEOUT = 120.0
RECOVERY_TIMEOUT = 60.0
MOUNT_OPTIONS = "io-timeout=20"
B_OPTIONS = "io-timeout=20,attr-timeout=0,entry-timeout=0"  # B sees A's changes at once
ACTOR = Path(__file__).with_name("fsactor.py")

_cases = itertools.count()


def payload(tag: int, size: int) -> bytes:
    """`size` bytes unique to `tag`, none of them zero."""
    seed = hashlib.sha256(b"%d" % tag).digest().replace(b"\0", b"\1")
    return (seed * (size // len(seed) + 1))[:size]


class Stage:
    """A cluster, mounts A and B of one directory, three actor processes: kept for all the
    cases of one test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cluster = LocalCluster(base / "cluster", workers=1, block_size=BLOCK).start()
        run_cluster(mkdirs, self.cluster.master_addrs, "/model")
        self.a = KeptMount(self.cluster.master_addrs, "/model", base / "a", MOUNT_OPTIONS).start()
        self.b = Mount(self.cluster.master_addrs, "/model", base / "b", B_OPTIONS).start()
        self.model = base / "model"
        self.model.mkdir()
        self.procs = [
            ActorProcess(self.a.path, CALL_TIMEOUT),
            ActorProcess(self.a.path, CALL_TIMEOUT),
            ActorProcess(self.b.path, CALL_TIMEOUT),
        ]
        self.noise = subprocess.Popen([sys.executable, str(ACTOR), "--noise", str(self.a.path)])
        self.fault: threading.Thread | None = None
        self.fault_error: list[BaseException] = []
        self.log: list[str] = []  # what the faults did, for the report

    def mounts_of(self, actor: int) -> Mount:
        return self.b if actor == 2 else self.a

    def restart_daemon(self, mount: Mount) -> None:
        mount.kill()
        mount.start()

    def background_fault(self, kind: str, delay: float) -> None:
        """Kill and restart a cluster process `delay` seconds from now, while operations go on."""
        self.join_fault()

        def run() -> None:
            try:
                time.sleep(delay)
                if kind == "worker":
                    self.cluster.kill_worker(0)
                    self.cluster.start_worker(0)
                else:
                    self.cluster.kill_master()
                    self.cluster.restart_master()
            except BaseException as exc:  # reported by join_fault
                self.fault_error.append(exc)

        self.log.append(f"{kind} killed after {delay:.2f} s")
        self.fault = threading.Thread(target=run)
        self.fault.start()

    def join_fault(self) -> None:
        if self.fault is not None:
            self.fault.join()
            self.fault = None
        if self.fault_error:
            raise self.fault_error.pop()

    def crash_everything(self) -> None:
        self.join_fault()
        self.cluster.kill_worker(0)
        self.cluster.kill_master()
        for mount in (self.a, self.b):
            mount.kill()
        self.cluster.start_master()
        self.cluster.start_worker(0)
        self.a.start()
        self.b.start()

    def close(self) -> None:
        try:
            self.join_fault()
        finally:
            for proc in self.procs:
                proc.close()
            self.noise.kill()
            self.noise.wait()
            self.a.stop()
            self.b.stop()
            self.cluster.stop()


@dataclass
class Handle:
    actor: int
    sut: int
    model: int
    flags: str
    ino: int  # the model file's inode: the file's identity across renames


def machine(stage: Stage, faults: bool):
    class FileSystemModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.case = f"case{next(_cases)}"
            self.root = stage.model / self.case
            (self.root / "s").mkdir(parents=True)
            self.models = [Actor(str(self.root)) for _ in stage.procs]
            assert stage.procs[0]("chroot", str(stage.a.path))["ok"] is None
            assert stage.procs[0]("mkdir", self.case) == {"ok": None}
            assert stage.procs[0]("mkdir", f"{self.case}/s") == {"ok": None}
            for i, proc in enumerate(stage.procs):
                proc("chroot", str(stage.mounts_of(i).path / self.case))
            self.handles: list[Handle] = []
            self.tag = 0
            self.cluster_faults = 0  # a takeover alone fails no call (journaled writes)
            # file (model inode) -> every state since its last acknowledged one, that first
            self.states: dict[int, list[bytes]] = {}

        # ---------------------------------------------------------------- plumbing

        def sut(self, actor: int, op: str, *args) -> dict:
            answer = stage.procs[actor](op, *args)
            shown = [a if not isinstance(a, str) or len(a) < 40 else f"<{len(a)}>" for a in args]
            result = str(answer)[:60]
            with open(stage.base / f"{self.case}.trace", "a") as f:
                f.write(f"{time.monotonic():.3f} actor{actor} {op}{tuple(shown)} -> {result}\n")
            return answer

        def model(self, actor: int, op: str, *args) -> dict:
            return self.models[actor].do(op, *args)

        def faulty(self, answer: dict) -> bool:
            return faults and answer.get("errno") in FAULT_ERRNOS

        def observe(self, actor: int, op: str, *args) -> dict:
            """A call that changes nothing: with faults, asked again until the cluster is back."""
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while True:
                got = self.sut(actor, op, *args)
                if not self.faulty(got) or time.monotonic() > deadline:
                    return got
                time.sleep(0.2)

        def content(self, name: str) -> bytes:
            return (self.root / name).read_bytes()

        def inode(self, name: str) -> int | None:
            try:
                return os.stat(self.root / name).st_ino
            except FileNotFoundError:
                return None

        def names_of(self, ino: int) -> list[str]:
            return [n for n in NAMES if self.inode(n) == ino]

        def file_state(self, ino: int) -> bytes:
            handle = next(h for h in self.handles if h.ino == ino)
            fd = self.models[handle.actor].fds[handle.model]
            with open(f"/proc/self/fd/{fd}", "rb") as f:  # also write-only and unlinked files
                return f.read()

        def changed(self, ino: int | None) -> None:
            """A tracked file went through one more state."""
            if ino in self.states:
                self.states[ino].append(self.file_state(ino))

        def acknowledged(self, ino: int) -> None:
            if any(h.ino == ino and h.flags != "r" for h in self.handles):
                self.states[ino] = [self.file_state(ino)]
            else:
                self.states.pop(ino, None)

        def plausible(self, ino: int, got: bytes, current: bytes) -> None:
            """`got` is made of states the file went through since it was last acknowledged
            (`current` alone when nothing is pending)."""
            states = self.states.get(ino) or [current]
            if got in states:
                return
            sizes = {len(s) for s in states}
            # a large write reaches the cluster piece by piece, and a read on the same mount
            # publishes what is there: a crash may leave any length between two states
            assert min(sizes) <= len(got) <= max(sizes), (
                f"length {len(got)} was never acknowledged nor written: {sizes}"
            )
            seen = numpy.frombuffer(got, dtype=numpy.uint8)
            held = numpy.zeros(len(got), dtype=bool)  # byte i equals byte i of some state
            for state in states:
                n = min(len(state), len(got))
                held[:n] |= seen[:n] == numpy.frombuffer(state, dtype=numpy.uint8)[:n]
            if not held.all():
                offset = int(numpy.argmin(held))
                raise AssertionError(
                    f"byte {offset} reads {got[offset]}, which no state of the file held "
                    f"({len(states)} states, sizes {sorted(sizes)})"
                )

        def settle_file(self, ino: int) -> None:
            """A file whose last writes may have been lost: check what it holds, then take
            that as the model's content."""
            stage.join_fault()
            names = self.names_of(ino)
            if names:
                got = self.observe(0, "read", names[0])
                assert "ok" in got, f"{names[0]} unreadable after recovery: {got}"
                data = unpack(got["ok"])
                self.plausible(ino, data, self.content(names[0]))
                with open(self.root / names[0], "r+b") as f:
                    f.truncate(0)
                    f.write(data)
            self.states.pop(ino, None)
            if any(h.ino == ino and h.flags != "r" for h in self.handles):
                self.states[ino] = [self.file_state(ino)]

        def drop(self, handle: Handle) -> None:
            self.handles.remove(handle)
            self.model(handle.actor, "close", handle.model)

        def lost_handle(self, handle: Handle) -> None:
            """A handle whose call failed under a fault: closed, its file settled."""
            self.sut(handle.actor, "close", handle.sut)
            self.drop(handle)
            self.settle_file(handle.ino)

        def tree(self, actor: int) -> dict:
            out = {}
            for d in DIRS:
                out[d] = self.observe(actor, "listdir", d)
            return out

        def model_tree(self) -> dict:
            return {d: self.model(0, "listdir", d) for d in DIRS}

        def namespace_call(self, actor: int, op: str, *args) -> dict:
            """A call that changes names: the same answer as the model, or under a fault an
            outcome that is all or nothing."""
            got = self.sut(actor, op, *args)
            if not self.faulty(got):
                want = self.model(actor, op, *args)
                assert got == want, f"{op}{args}: {got} != model {want}"
                return got
            stage.join_fault()
            before = self.model_tree()
            seen = self.tree(0)
            if seen != before:
                self.model(actor, op, *args)  # the change happened after all
                assert seen == self.model_tree(), f"{op}{args} left {seen}, model {before}"
                stage.log.append(f"{op}{args} failed {got['errno']} but took effect")
                return {"ok": None, "applied": True}
            return got

        def pick(self, data, writable: bool | None = None, readable: bool = False):
            choices = [
                h
                for h in self.handles
                if (writable is None or (h.flags != "r") == writable)
                and (not readable or h.flags in ("r", "rw"))
            ]
            return data.draw(st.sampled_from(choices)) if choices else None

        # ---------------------------------------------------------------- changes

        @rule(actor=st.integers(0, 1), name=st.sampled_from(NAMES), flags=st.sampled_from(FLAGS))
        def open(self, actor, name, flags):
            if len(self.handles) >= 6:
                return
            before = self.inode(name)
            old = self.content(name) if before is not None else None
            got = self.sut(actor, "open", name, flags)
            if self.faulty(got):
                stage.join_fault()
                if before is None:
                    seen = self.tree(0)
                    if seen != self.model_tree():  # created all the same
                        self.model(actor, "close", self.model(actor, "open", name, flags)["ok"])
                        assert seen == self.model_tree(), f"open {name} left {seen}"
                        stage.log.append(f"open {name} failed {got['errno']} but created it")
                elif flags == "w":  # O_TRUNC may have cut it or not
                    self.states.setdefault(before, [old]).append(b"")
                    self.settle_file(before)
                return
            want = self.model(actor, "open", name, flags)
            assert ("ok" in got) == ("ok" in want), f"open {name} {flags}: {got} != {want}"
            if "ok" not in got:
                assert got == want
                return
            handle = Handle(actor, got["ok"], want["ok"], flags, self.inode(name))
            self.handles.append(handle)
            if flags != "r" and handle.ino not in self.states:
                self.states[handle.ino] = ([] if old is None else [old]) + [
                    self.file_state(handle.ino)
                ]
            elif flags == "w":
                self.changed(handle.ino)

        @rule(
            data=st.data(),
            size=st.one_of(st.integers(1, 4096), st.integers(4097, 300_000), st.just(3 << 20)),
        )
        def write(self, data, size):
            handle = self.pick(data, writable=True)
            if handle is None:
                return
            self.tag += 1
            chunk = pack(payload(self.tag, size))
            if data.draw(st.booleans()) or handle.flags == "a":
                args = ("write", handle.sut, chunk)
                margs = ("write", handle.model, chunk)
            else:
                offset = data.draw(st.integers(0, 400_000))
                args = ("pwrite", handle.sut, offset, chunk)
                margs = ("pwrite", handle.model, offset, chunk)
            got = self.sut(handle.actor, *args)
            if self.faulty(got):
                self.lost_handle(handle)
                return
            want = self.model(handle.actor, *margs)
            assert got == want, f"{args[0]}: {got} != model {want}"
            self.changed(handle.ino)

        @rule(data=st.data())
        def fsync(self, data):
            handle = self.pick(data, writable=True)
            if handle is None:
                return
            got = self.sut(handle.actor, "fsync", handle.sut)
            if self.faulty(got):
                self.lost_handle(handle)
                return
            assert got == self.model(handle.actor, "fsync", handle.model)
            self.acknowledged(handle.ino)

        @rule(data=st.data())
        def close(self, data):
            handle = self.pick(data)
            if handle is None:
                return
            got = self.sut(handle.actor, "close", handle.sut)
            self.drop(handle)
            if self.faulty(got):
                self.settle_file(handle.ino)
                return
            assert got == {"ok": None}, f"close: {got}"
            self.acknowledged(handle.ino)

        @rule(actor=st.integers(0, 1), name=st.sampled_from(NAMES), size=st.integers(0, 400_000))
        def truncate(self, actor, name, size):
            ino = self.inode(name)
            old = self.content(name) if ino is not None else None
            got = self.sut(actor, "truncate", name, size)
            if self.faulty(got):
                if ino is not None:
                    states = self.states.setdefault(ino, [old])
                    with open(self.root / name, "r+b") as f:
                        f.truncate(size)
                    states.append(self.content(name))
                    self.settle_file(ino)
                return
            assert got == self.model(actor, "truncate", name, size)
            self.changed(ino)

        @rule(actor=st.integers(0, 1), old=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
        def rename(self, actor, old, new):
            self.namespace_call(actor, "rename", old, new)

        @rule(actor=st.integers(0, 1), name=st.sampled_from(NAMES))
        def unlink(self, actor, name):
            self.namespace_call(actor, "unlink", name)

        # ---------------------------------------------------------------- observations

        @rule(actor=st.integers(0, 2), name=st.sampled_from(NAMES))
        def read(self, actor, name):
            if actor == 2 and any(h.flags != "r" for h in self.handles):
                return  # another node sees a file complete only once it was closed
            got = self.observe(actor, "read", name)
            want = self.model(actor, "read", name)
            assert got == want, f"read {name} on {'AB'[actor // 2]}: " + describe(got, want)

        @rule(actor=st.integers(0, 1), name=st.sampled_from(NAMES))
        def stat(self, actor, name):
            got = self.observe(actor, "stat", name)
            assert got == self.model(actor, "stat", name), f"stat {name}"

        @rule(actor=st.integers(0, 2), d=st.sampled_from(DIRS))
        def listdir(self, actor, d):
            got = self.observe(actor, "listdir", d)
            assert got == self.model(actor, "listdir", d), f"listdir {d} on actor {actor}"

        @rule(data=st.data(), offset=st.integers(0, 400_000), size=st.integers(1, 200_000))
        def pread(self, data, offset, size):
            handle = self.pick(data, readable=True)
            if handle is None:
                return
            got = self.sut(handle.actor, "pread", handle.sut, offset, size)
            if self.faulty(got):
                self.lost_handle(handle)
                return
            want = self.model(handle.actor, "pread", handle.model, offset, size)
            assert got == want, "pread: " + describe(got, want)

        # ---------------------------------------------------------------- faults

        @precondition(lambda self: faults)
        @rule(kind=st.sampled_from(["worker", "master"]), delay=st.floats(0, 0.5))
        def cluster_fault(self, kind, delay):
            self.cluster_faults += 1
            stage.background_fault(kind, delay)

        @precondition(lambda self: faults)
        @rule()
        def daemon_killed(self):
            stage.join_fault()
            stage.log.append("daemon A killed")
            lost = [h for h in self.handles if h.actor < 2]
            stage.restart_daemon(stage.a)
            for actor in (0, 1):
                stage.procs[actor]("forget")
            for handle in lost:
                self.drop(handle)
            for ino in {h.ino for h in lost if h.flags != "r"}:
                self.settle_file(ino)

        @precondition(lambda self: faults)
        @rule(data=st.data(), size=st.one_of(st.just(0), st.integers(1, 300_000)))
        def daemon_taken_over(self, data, size):
            """Handles stay open and writes not yet fsync'd or closed are replayed from the
            journal: the next call, here an fsync, succeeds and the file is what the model
            holds. Only a cluster fault earlier in the case may have made a loss (EIO), which
            is settled like any loss. With `size`, a write comes just before the kill (the
            noise process reads files on mount A, which commits them: this one is not)."""
            stage.join_fault()
            if size:
                self.write(data, size)
            stage.log.append(f"daemon A killed and taken over ({size} bytes written just before)")
            stage.a.replace(signal.SIGKILL)
            for handle in [h for h in self.handles if h.actor < 2 and h.flags != "r"]:
                if handle not in self.handles:
                    continue  # closed by the loss of another handle of its file
                got = self.sut(handle.actor, "fsync", handle.sut)
                if self.faulty(got):
                    assert self.cluster_faults, f"fsync after a takeover: {got}"
                    self.lost_handle(handle)
                else:
                    assert got == self.model(handle.actor, "fsync", handle.model)
                    self.acknowledged(handle.ino)

        # ---------------------------------------------------------------- the end

        def compare_all(self, when: str) -> None:
            assert self.tree(0) == self.model_tree(), f"names differ {when}"
            assert self.tree(2) == self.model_tree(), f"names differ on B {when}"
            for name in NAMES:
                want = self.model(0, "read", name)
                for actor in (0, 2):
                    got = self.observe(actor, "read", name)
                    assert got == want, f"{name} {when} on {'AB'[actor // 2]}: " + describe(
                        got, want
                    )

        def teardown(self):
            try:
                stage.join_fault()
                for handle in list(self.handles):
                    got = self.sut(handle.actor, "close", handle.sut)
                    self.drop(handle)
                    if self.faulty(got):
                        self.settle_file(handle.ino)
                    else:
                        assert got == {"ok": None}, f"close at the end: {got}"
                self.states.clear()
                self.compare_all("after the last close")
                if faults:
                    stage.crash_everything()
                    stage.log.append("every process killed and restarted")
                    self.compare_all("after every process was killed")
            finally:
                for actor in range(len(stage.procs)):
                    stage.procs[actor]("forget")
                for model in self.models:
                    model.op_forget()

    return FileSystemModel


def describe(got: dict, want: dict) -> str:
    if "ok" in got and "ok" in want and isinstance(got["ok"], str):
        a, b = unpack(got["ok"]), unpack(want["ok"])
        diff = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
        return f"{len(a)} bytes vs model {len(b)}, first difference at {diff}"
    return f"{got} != model {want}"


@pytest.fixture
def stage(tmp_path):
    stage = Stage(tmp_path)
    try:
        yield stage
    finally:
        stage.close()


def run(stage: Stage, faults: bool) -> None:
    run_state_machine_as_test(
        machine(stage, faults),
        settings=settings(
            max_examples=EXAMPLES or (12 if faults else 100),  # the CI share: ~1.5 min
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=False,
            print_blob=True,
        ),
    )
    (stage.base / "faults.log").write_text("\n".join(stage.log))
    print("\n".join(stage.log))


def test_operations_from_three_processes_match_a_local_directory(stage):
    run(stage, faults=False)


def test_acknowledged_data_survives_killed_workers_masters_and_daemons(stage):
    run(stage, faults=True)


def test_payload_has_no_zero_bytes():
    assert all(b"\0" not in payload(tag, 5000) for tag in range(200))
