"""``dtrain launch run [torchrun options] -- [overrides]``: torchrun, with the workers' exit code.

What every rendered launcher runs on each node. In order:

1. Validate the config for the job's world size (a bad config exits 2 here, before any rendezvous,
   so torchrun's ``--max-restarts`` never retries it).
2. Wait for the rendezvous host: its DNS name must resolve (a Kubernetes headless Service publishes
   pod names only once the pods exist, pytorch#73682), and on the other nodes its port must accept
   connections. Each wait ends after ``--host-timeout-s`` with a one-line error naming the host.
3. Run torchrun with ``DTRAIN_EXIT_DIR`` (where each worker writes its exit code, see
   ``dtrain/exit_codes.py``) and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (with gloo, in-place restarts
   hang on a store that still holds the dead workers' addresses). SIGTERM, SIGINT and SIGUSR1 are
   forwarded to torchrun, which forwards them to the workers (``--signals-to-handle``): Kubernetes
   signals only the container's first process, which is this one. Not inside a Slurm step: slurmstepd
   signals every process of the step itself, and a second copy from here would reach torchrun while it
   handles the first, which makes it abandon its workers and SIGTERM them (a crash, no checkpoint).
4. Wait for torchrun *and* every worker: this process is a child subreaper, so workers orphaned by an
   agent that died early (a second signal interrupts torchrun's own shutdown) are still waited for, and
   killed only after ``--shutdown-timeout``.
5. Exit with the contract's code (0 / 2 / 75 / 1), never torchrun's blanket 1.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from dtrain import exit_codes
from dtrain.config.errors import ConfigError

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_CHILD_SUBREAPER = 36


def say(message: str) -> None:
    print(f"dtrain launch [{socket.gethostname()}]: {message}", file=sys.stderr, flush=True)


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` (also with underscores, as torchrun accepts)."""
    names = {name, name.replace("-", "_")}
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key in names:
            return value if sep else (args[i + 1] if i + 1 < len(args) else None)
    return None


def split_args(argv: Sequence[str]) -> tuple[list[str], float, list[str]]:
    """``[torchrun args] [--host-timeout-s S] -- [overrides]`` -> (torchrun args, host timeout, overrides)."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        head, overrides = argv[:cut], argv[cut + 1:]
    else:
        head, overrides = argv, []
    timeout = _option(head, "--host-timeout-s")
    torchrun = []
    skip = False
    for i, arg in enumerate(head):
        if skip:
            skip = False
            continue
        if arg.partition("=")[0] in ("--host-timeout-s", "--host_timeout_s"):
            skip = "=" not in arg
            continue
        torchrun.append(arg)
    return torchrun, float(timeout) if timeout else 900.0, overrides


def _is_rendezvous_host(addresses: list[str]) -> bool:
    """Node 0 hosts the rendezvous store: the Kubernetes pod with index 0, the Slurm task on node 0;
    elsewhere, the machine the endpoint's name resolves to."""
    for var in ("JOB_COMPLETION_INDEX", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    local = {"127.0.0.1", "::1"}
    try:
        local |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return any(a in local or a.startswith("127.") for a in addresses)


def wait_for_host(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host`` resolves and, unless this node hosts the rendezvous, accepts connections on
    ``port``; raise ConfigError (DNS: a wrong name or a missing Service) or RuntimeError (the port: node 0
    is late or down, worth a retry) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    addresses: list[str] = []
    said = False
    while not addresses:
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise ConfigError(f"rendezvous host {host!r} did not resolve within {timeout_s:g} s; check the "
                                  "host name (Kubernetes: the headless Service and the pods' subdomain)") from None
            if not said:
                say(f"waiting for rendezvous host {host!r} to resolve (up to {timeout_s:g} s)")
                said = True
            time.sleep(0.5)
    if _is_rendezvous_host(addresses):
        return
    said = False
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rendezvous host {host}:{port} ({', '.join(addresses)}) did not accept "
                                   f"connections within {timeout_s:g} s ({e}); is node 0 running?") from None
            if not said:
                say(f"waiting for rendezvous host {host}:{port} to accept connections (up to {timeout_s:g} s)")
                said = True
            time.sleep(0.5)


def _become_subreaper() -> None:
    """Orphaned descendants (workers of an agent that exited early) become our children, not init's."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans are then not waited for


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


class TorchrunSupervisor:
    """Runs torchrun, forwards signals to it, and waits for it and every worker it leaves behind."""

    def __init__(self, argv: list[str], env: dict[str, str], exit_dir: Path, shutdown_timeout_s: float):
        self.argv, self.env, self.exit_dir = argv, env, exit_dir
        self.shutdown_timeout_s = shutdown_timeout_s
        self.agent: subprocess.Popen | None = None
        self.agent_code: int | None = None
        self._stopped_for_config_error = False

    def _forward(self, signum: int, frame: object) -> None:
        if "SLURM_STEP_ID" in os.environ:
            os.write(2, f"dtrain launch: {signal.Signals(signum).name} reached torchrun from slurmstepd too; "
                        "not forwarding a second copy\n".encode())
            return
        if self.agent is not None and self.agent_code is None:
            os.write(2, f"dtrain launch: forwarding {signal.Signals(signum).name} to torchrun\n".encode())
            try:
                os.kill(self.agent.pid, signum)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        _become_subreaper()
        previous = {sig: signal.signal(sig, self._forward) for sig in _FORWARDED}
        try:
            self.agent = subprocess.Popen(self.argv, env=self.env)
            self._reap_until_agent_exits()
            self._reap_orphans()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        assert self.agent_code is not None
        return self.agent_code

    def _reap(self) -> None:
        """Collect every exited child without blocking; note the agent's exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.agent is not None and pid == self.agent.pid:
                # reaped here, so Popen must not wait for it again
                self.agent.returncode = self.agent_code = os.waitstatus_to_exitcode(status)

    def _reap_until_agent_exits(self) -> None:
        while self.agent_code is None:
            self._reap()
            if self.agent_code is None:
                self._stop_on_config_error()
                time.sleep(0.1)

    def _stop_on_config_error(self) -> None:
        """A worker's config or storage verdict is final: stop torchrun before ``--max-restarts`` retries it."""
        if self._stopped_for_config_error:
            return
        markers = exit_codes.read_markers(self.exit_dir)
        if any(exit_codes.CONFIG_ERROR in codes.values() for codes in markers.values()):
            # at once: a marker is written after the reporting rank printed its message, and torchrun
            # restarts a failed group within a fraction of a second (a 3 s pause let the restarted
            # workers report the same error again)
            self._stopped_for_config_error = True
            try:
                os.kill(self.agent.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap_orphans(self) -> None:
        """Workers whose agent left early finish their save; after the shutdown timeout they are killed."""
        deadline = time.monotonic() + self.shutdown_timeout_s
        while True:
            self._reap()
            left = _children()
            if not left:
                return
            if time.monotonic() > deadline:
                say(f"killing {len(left)} worker(s) still running {self.shutdown_timeout_s:g} s after torchrun exited")
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = float("inf")
            time.sleep(0.1)


def cmd_run(argv: Sequence[str]) -> int:
    from dtrain.config.validate import load_config

    torchrun_args, host_timeout, overrides = split_args(argv)
    nnodes = _option(torchrun_args, "--nnodes") or "1"
    nproc = _option(torchrun_args, "--nproc-per-node") or "1"
    endpoint = _option(torchrun_args, "--rdzv-endpoint")
    shutdown_timeout = float(_option(torchrun_args, "--shutdown-timeout") or 30)
    try:
        world = int(nnodes.split(":")[-1]) * int(nproc)
    except ValueError:
        say(f"--nnodes={nnodes} --nproc-per-node={nproc}: dtrain launch run needs numbers")
        return exit_codes.CONFIG_ERROR
    try:
        load_config(overrides, world)
        if endpoint:
            host, _, port = endpoint.rpartition(":")
            wait_for_host(host or endpoint, int(port or 29400), host_timeout)
    except ConfigError as e:
        print(e.render(), file=sys.stderr, flush=True)
        return exit_codes.CONFIG_ERROR
    except RuntimeError as e:
        say(str(e))
        return exit_codes.CRASH
    exit_dir = Path(tempfile.mkdtemp(prefix="dtrain-exit-"))
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{exit_codes.EXIT_DIR_VAR: str(exit_dir)})
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "dtrain", *overrides]
    try:
        agent_code = TorchrunSupervisor(command, env, exit_dir, shutdown_timeout).run()
        code = exit_codes.verdict(exit_codes.read_markers(exit_dir), agent_code)
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)
    say(f"training exited {code} ({exit_codes.meaning(code)}); torchrun itself exited {agent_code}")
    return code
