"""Several torchrun agents on this machine, each playing one node, bounded in time (Lesson 11, §1-§2).

Every agent of one launch gets the same tag in its environment (TAG_ENV), and its workers inherit
it. torchrun starts each worker in a session of its own, so the tag, not a process group, is what
finds them all: on a timeout, an error or an interrupt `stop_tagged` stops every one, and
`processes_tagged` shows that nothing is left.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from mvtk.distributed.sharded import PAUSED_MARK
from mvtk.errors import InvalidArgumentError, ParallelError, check_positive_int

__all__ = ["AGENT", "WORKER", "TAG_ENV", "FRESH_STORE_ENV", "NodesRun", "local_endpoint", "node_command", "launch_nodes",
           "processes_tagged", "stop_tagged", "worker_results", "kill_during_save"]

AGENT = (sys.executable, "-m", "torch.distributed.run")  # torchrun of this very Python (same venv)
WORKER = ("-m", "mvtk.distributed")  # the course's worker: python -m mvtk.distributed TASK ...
TAG_ENV = "MVTK_LAUNCH_TAG"  # set for the agents of one launch; their workers inherit it
# 1: every worker group gets a store of its own (rank 0 hosts it on a new port each round). By default the
# workers share the agents' rendezvous store, whose keys carry no round: after a restart, a new worker
# can read the address a dead worker of the previous group left there and fail to connect (seen here
# under load as "Gloo connectFullMesh failed ... Connection refused", which used up --max-restarts).
FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass
class NodesRun:
    """What `launch_nodes` saw: each agent's exit code and output, its tag and its duration (Lesson 11, §1)."""

    returncodes: list[int]
    outputs: list[str]
    tag: str = ""  # TAG_ENV of every process of the run: processes_tagged(run.tag) lists what is left
    seconds: float = 0.0

    def lines(self, marker: str) -> list[str]:
        """Every output line, of every node, that contains `marker`, in node order (Lesson 11, §1)."""
        return [line for text in self.outputs for line in text.splitlines() if marker in line]


def local_endpoint(host: str = "127.0.0.1") -> str:
    """'HOST:PORT' with a port nothing listens on now: where the agents meet (Lesson 11, §1).

    The operating system picks the port (the same idea as lesson 05's `free_port`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"


def node_command(args: Sequence[str], *, node_rank: int, nnodes: int | str = 2, nproc_per_node: int = 1,
                 endpoint: str, rdzv_id: str = "mvtk", max_restarts: int = 0,
                 rdzv_conf: str | None = None) -> list[str]:
    """The torchrun command one node runs; every node runs it with its own `node_rank` (Lesson 11, §1-§2).

    `nnodes` is a number (2) or an elastic range ('1:2'); `args` follow `python -m mvtk.distributed`.
    With the c10d rendezvous torchrun assigns ranks by arrival and uses --node-rank for nothing but
    logs; the workers read their RANK from the environment. `rdzv_conf` ('last_call_timeout=30,...'):
    keep the default last call (30 s) for elastic jobs, or a node that comes back a second late is
    left out of the round, joins the next one, and forces one more restart.
    """
    check_positive_int(nproc_per_node, "nproc_per_node", ParallelError)
    if ":" not in str(endpoint):
        raise ParallelError(f"endpoint must be 'HOST:PORT', got {endpoint!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ParallelError(f"max_restarts must be a whole number >= 0, got {max_restarts!r}")
    command = [*AGENT, f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc_per_node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.1"]
    if rdzv_conf:
        command.append(f"--rdzv-conf={rdzv_conf}")
    return command + [*WORKER, *map(str, args)]


def launch_nodes(args: Sequence[str], *, nodes: int = 2, nnodes: int | str | None = None, nproc_per_node: int = 1,
                 max_restarts: int = 0, node_args: Mapping[int, Sequence[str]] | None = None,
                 cwd: str | os.PathLike | None = None, timeout: float = 120, threads: int = 1,
                 env: Mapping[str, str] | None = None, tag: str | None = None) -> NodesRun:
    """Start `nodes` torchrun agents that meet at a free 127.0.0.1 port; wait for all of them (Lesson 11, §1-§2).

    Every node runs `python -m mvtk.distributed ARGS`, plus `node_args[node]` for that node only (how
    §2 makes one node fail). `nnodes` defaults to `nodes`; '1:2' makes the job elastic. With
    `max_restarts` N, a failed worker makes the agents restart the whole group up to N times. Each
    worker gets `threads` CPU threads, and every worker group a store of its own (FRESH_STORE_ENV),
    so a restarted group never reads a dead group's addresses. Raises ParallelError, after stopping
    every process, when an agent fails or the run outlasts `timeout` seconds. `tag` (default: a new
    random one) is the rendezvous id and every process's TAG_ENV value.
    """
    check_positive_int(nodes, "nodes", ParallelError)
    endpoint = local_endpoint()
    rdzv_id = tag or f"mvtk-{uuid.uuid4().hex[:8]}"
    variables = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                 FRESH_STORE_ENV: "1", **(env or {}), TAG_ENV: rdzv_id}
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds mvtk: workers import it from anywhere
    variables["PYTHONPATH"] = os.pathsep.join(p for p in (root, variables.get("PYTHONPATH")) if p)
    agents, logs = [], []
    begin = time.perf_counter()
    try:
        for node in range(nodes):
            command = node_command([*args, *(node_args or {}).get(node, ())], node_rank=node,
                                   nnodes=nnodes or nodes, nproc_per_node=nproc_per_node, endpoint=endpoint,
                                   rdzv_id=rdzv_id, max_restarts=max_restarts)
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            agents.append(subprocess.Popen(command, cwd=cwd, env=variables, stdout=log, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True))
        deadline = time.monotonic() + timeout
        for agent in agents:
            agent.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_tagged(rdzv_id)
        raise ParallelError(f"the {nodes} torchrun agents were still running after {timeout:g} s; they and their "
                            f"workers were killed.\nlast output:\n{_read(logs)[-1][-3000:]}") from None
    finally:  # also on an error or Ctrl-C: no agent or worker outlives the call
        stop_tagged(rdzv_id)
        for agent in agents:
            try:
                agent.wait(timeout=10)  # reap it: no zombie left behind
            except subprocess.TimeoutExpired:
                pass
    run = NodesRun([a.returncode for a in agents], _read(logs), rdzv_id, time.perf_counter() - begin)
    if any(run.returncodes):
        error = ParallelError(f"torchrun agents exited with codes {run.returncodes}.\nlast output of each node:\n"
                              + "\n".join(f"--- node {n} ---\n{text[-2000:]}" for n, text in enumerate(run.outputs)))
        error.run = run  # every node's whole output, for a closer look
        raise error
    return run


def _read(logs) -> list[str]:
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return texts


def processes_tagged(tag: str) -> list[int]:
    """The pids of every live process started with TAG_ENV=`tag`: agents and their workers (Lesson 11, §1).

    torchrun starts each worker in a session of its own, so a process group or session id cannot
    find them all; the environment variable every child inherits can. Zombies are not counted (they
    have exited and wait for their parent to read their status). Reads /proc (Linux); elsewhere `ps`.
    """
    if not isinstance(tag, str) or not tag:
        raise InvalidArgumentError(f"tag must be a non-empty string, got {tag!r}")
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    if Path("/proc").is_dir():
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = (Path("/proc") / entry / "environ").read_bytes()
                state = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # gone, or another user's process
                continue
            if state != "Z" and needle in environ.split(b"\0"):
                found.append(int(entry))
        return sorted(found)
    listing = subprocess.run(["ps", "eww", "-A", "-o", "pid=,stat=,command="], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and not parts[1].startswith("Z") and needle.decode() in parts[2].split():
            found.append(int(parts[0]))
    return sorted(found)


def stop_tagged(tag: str, grace: float = 3.0) -> None:
    """SIGTERM every process tagged `tag`, then SIGKILL whatever is left after `grace` seconds (Lesson 11, §1)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = processes_tagged(tag)
        for pid in live:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while processes_tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not processes_tagged(tag):
            return


def worker_results(out: str | os.PathLike, task: str) -> list[dict]:
    """What each rank of `python -m mvtk.distributed TASK --out OUT` returned, in rank order (Lesson 11, §1-§4)."""
    paths = sorted(Path(out).glob(f"{task}-rank*.json"), key=lambda p: int(p.stem.rpartition("rank")[2]))
    if not paths:
        raise InvalidArgumentError(f"no results of task {task!r} in {str(out)!r}: did the launch run that task there?")
    return [json.loads(p.read_text()) for p in paths]


def kill_during_save(out: str | os.PathLike, *, size_mb: float = 4.0, seed: int = 0, timeout: float = 60) -> list[str]:
    """Run a process that saves step 1, then SIGKILL it in the middle of saving step 2 (Lesson 11, §3).

    The process (`python -m mvtk.distributed pause-save`) writes every shard of step 2, prints
    PAUSED_MARK and waits before writing .metadata (the pause_before_commit test hook); this
    function kills it there. Returns the process's output lines. Raises ParallelError if the mark
    does not come within `timeout` seconds (the process is killed all the same).
    """
    root = str(Path(__file__).resolve().parents[2])
    variables = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    variables["PYTHONPATH"] = os.pathsep.join(p for p in (root, variables.get("PYTHONPATH")) if p)
    variables.pop("RANK", None)  # one process, no group
    command = [sys.executable, *WORKER, "pause-save", "--out", str(out), "--size-mb", str(size_mb),
               "--seed", str(seed), "--pause", str(timeout * 2)]
    process = subprocess.Popen(command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = process.stdout.readline()
                if not line:
                    break  # the process ended by itself
                lines.append(line.rstrip("\n"))
                if PAUSED_MARK in line:
                    os.killpg(process.pid, signal.SIGKILL)  # mid-save: shards written, .metadata not
                    process.wait()
                    return lines
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    raise ParallelError(f"the saving process did not reach the pause within {timeout:g} s; its output:\n"
                        + "\n".join(lines[-30:]))
