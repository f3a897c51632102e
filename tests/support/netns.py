"""Two "hosts" on one Linux machine, joined by nothing but a TCP link (for tests and benchmarks
of what two machines get).

Each host is a network namespace (`ip netns`) with a PID namespace and a mount namespace of
its own, held by a small init process (`hold` below): the host's processes see only each
other in /proc and share a private tmpfs on /dev/shm. The two network namespaces are joined
by a veth pair, shaped on both ends by `tc ... tbf rate 10gbit` (a 10 GbE link, not
loopback's tens of GB/s). So two processes of one host can share memory as on one machine
(a memfd through /proc/<pid>/fd), and processes of different hosts can reach each other
only through TCP on that link: a pid from the other host names no process (or another one)
here, its /dev/shm is not this one's.

`TwoHosts` makes them and gives each host's IP, `popen` starts a command in a host (its pid
is a thin wrapper outside the namespaces that forwards signals to the command and takes it
down with it on SIGKILL, so a process is stopped or killed by the pid the caller holds, as
tests/support/cluster.py and moe_serve/tools/launcher.py do), and `call` runs an importable
function in a host and returns its result. Names are unique per process (`msh<pid>n<k>a`);
everything is removed on `close`, at the interpreter's exit, and, for a run that was killed,
by the next `TwoHosts` of any process (namespaces and links whose owner pid is gone).

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), `ip` and `tc` (iproute2) on Linux;
`unavailable()` says why not where they are missing or refused.

This module imports only the standard library: it runs as the wrapper and the init
(`python netns.py enter|hold|call ...`), which should start fast and stay small.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import importlib
import itertools
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

PREFIX = "msh"  # moe_serve hosts
_NAME = re.compile(rf"^{PREFIX}(\d+)n(\d+)[ab]$")  # netns and veth ends: owner pid, index
SUBNET = "10.213.0"  # /30 inside each pair: A is .1, B is .2 (namespaces keep pairs apart)
LINK_RATE = "10gbit"
# tbf needs a bucket of at least rate / HZ (1.25 MB at 10 Gbit/s and HZ=1000) to reach its rate.
LINK_BURST = "4mb"
LINK_LATENCY = "10ms"
SHM_BYTES = 1 << 30  # each host's /dev/shm (tmpfs: pages are taken only when written)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_counter = itertools.count()

# Linux constants (sched.h, mount.h, prctl.h).
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


class HostsUnavailableError(RuntimeError):
    """Namespaces cannot be made here; the message says why (for a skip)."""


class HostCallError(RuntimeError):
    """A function run in a host by `TwoHosts.call` raised or its process failed."""


# ------------------------------------------------------------------ syscalls ---


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(fd, nstype), f"setns({path})")
    finally:
        os.close(fd)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc().mount(
        source.encode(),
        target.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    _check(rc, f"mount {target}")


def _die_with_parent() -> None:
    _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


# ------------------------------------------------------- inside the namespaces ---


def hold(netns: str, shm_bytes: int) -> int:
    """The host's holder (runs as `netns.py hold NETNS SHM_BYTES`): join `netns`, make the
    host's PID and mount namespaces, fork their init; print the init's pid (as this process
    sees it) once it has mounted the host's /proc and /dev/shm; wait for it."""
    _setns(f"/run/netns/{netns}", CLONE_NEWNET)
    _check(_libc().unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare(mount, pid)")
    # Mounts made here stay here (and the host's /dev/shm hides the machine's).
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    ready_r, ready_w = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the host
        os.close(ready_r)
        try:
            _die_with_parent()
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            _mount(
                "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={shm_bytes},mode=1777"
            )
        except OSError as exc:
            os.write(ready_w, str(exc).encode())
            os._exit(1)
        os.close(ready_w)
        _init()
    os.close(ready_w)
    error = os.read(ready_r, 4096).decode()
    if error:
        print(error, file=sys.stderr)
        os.waitpid(init, 0)
        return 1
    print(init, flush=True)
    for sig in _FORWARDED:  # pid 1 receives from outside only the signals it handles
        signal.signal(sig, lambda s, _f: os.kill(init, s))
    return os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])


def _init() -> None:
    """pid 1 of a host: reap whatever is orphaned into it; exit on SIGTERM (the kernel then
    kills every process of the host)."""
    for sig in _FORWARDED:
        signal.signal(sig, lambda _s, _f: os._exit(0))
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.5)


def enter(init_pid: int, cwd: str, cmd: list[str]) -> int:
    """The wrapper of a command in a host (`netns.py enter INIT_PID CWD -- CMD...`): join the
    namespaces of the host's init, run `cmd` there as a child; forward signals to it, exit as
    it exits (by the same signal). The child dies with this process (SIGKILL included)."""
    # Every namespace opened before any is joined: inside the host's mount namespace, /proc
    # is the host's, where INIT_PID is another process or none.
    fds = [
        (os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC), kind)
        for ns, kind in (("net", CLONE_NEWNET), ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
    ]
    for fd, kind in fds:
        _check(_libc().setns(fd, kind), f"setns({kind:#x})")
        os.close(fd)
    os.chdir(cwd)  # joining a mount namespace moved us to its root
    # A signal that comes before the forwarding is set up waits for it (not lost, and not
    # this process's death by default action, which would SIGKILL the child).
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    child = os.fork()
    if child == 0:
        _die_with_parent()
        if os.getppid() != 0:  # our parent (outside this PID namespace) died before prctl
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if code < 0:  # killed by a signal: so is this process
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _call(job: str) -> int:
    """Run the function of a `TwoHosts.call` job file in this process (inside a host)."""
    sys.path.insert(0, os.getcwd())  # the caller's cwd: its modules import as they did there
    with open(job, "rb") as f:
        module, name, args, kwargs = pickle.load(f)
    try:
        result: tuple[str, Any] = (
            "ok",
            getattr(importlib.import_module(module), name)(*args, **kwargs),
        )
    except BaseException as exc:  # reported to the caller, which raises HostCallError
        import traceback

        result = ("error", "".join(traceback.format_exception(exc)))
    with open(job + ".out", "wb") as f:
        pickle.dump(result, f)
    return 0


# ------------------------------------------------------------------ the hosts ---


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise HostsUnavailableError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unavailable() -> str | None:
    """Why two hosts cannot be made here (None: they can be tried)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "two hosts need root (ip netns, unshare, mount)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"two hosts need iproute2: {', '.join(missing)} not found"
    return None


def namespaces() -> list[str]:
    """Every network namespace name of this harness (any owner) that `ip netns` lists."""
    names = _run("ip", "netns", "list", check=False).stdout.split()
    return [n for n in names if _NAME.match(n)]


def links() -> list[str]:
    """Every network link of this harness left in this namespace (a pair not yet moved)."""
    out = _run("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if _NAME.match(n)]


def _remove(netns: list[str], links: list[str]) -> list[str]:
    """Kill by pid what runs in each namespace of `netns`, delete them, then the `links`."""
    for ns in netns:
        for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _run("ip", "netns", "delete", ns, check=False)
    for link in links:
        _run("ip", "link", "delete", link, check=False)
    return [*netns, *links]


def remove_leftovers(owner: int | None = None) -> list[str]:
    """Remove the namespaces and links of this harness whose owner process is gone (or of
    `owner`): kill by pid what still runs in them, delete them. Returns what was removed."""

    def owned(name: str) -> bool:
        m = _NAME.match(name)
        if m is None:
            return False
        pid = int(m.group(1))
        return pid == owner if owner is not None else not _alive(pid)

    return _remove([n for n in namespaces() if owned(n)], [n for n in links() if owned(n)])


@dataclasses.dataclass
class Host:
    """One of the two hosts."""

    name: str  # "a" or "b"
    netns: str  # its network namespace (`ip netns` name; also its veth end's name)
    ip: str  # its address on the link
    holder: subprocess.Popen[str] | None = None
    init_pid: int = 0  # its pid 1, as this process sees it


class TwoHosts:
    """Hosts A and B, joined by a veth pair with a 10 Gbit/s token bucket on both ends.

    `with TwoHosts() as hosts:` makes them (HostsUnavailableError where namespaces are
    refused); `hosts.a.ip`, `hosts.b.ip`; `hosts.popen(hosts.b, [...])` starts a process in
    B; `hosts.call(hosts.a, fn, *args)` runs an importable function in A. Leaving the block,
    `close()`, or the interpreter's exit removes both (and every process in them)."""

    def __init__(
        self,
        rate: str = LINK_RATE,
        burst: str = LINK_BURST,
        latency: str = LINK_LATENCY,
        shm_bytes: int = SHM_BYTES,
    ) -> None:
        self.link = {"rate": rate, "burst": burst, "latency": latency}
        self.shm_bytes = shm_bytes
        base = f"{PREFIX}{os.getpid()}n{next(_counter)}"
        self.a = Host("a", base + "a", f"{SUBNET}.1")
        self.b = Host("b", base + "b", f"{SUBNET}.2")
        self._tmp: Path | None = None
        self._closed = True

    def __enter__(self) -> TwoHosts:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def open(self) -> None:
        """Make both hosts and the link; HostsUnavailableError (after cleaning up) if refused."""
        why = unavailable()
        if why is not None:
            raise HostsUnavailableError(why)
        remove_leftovers()
        self._closed = False
        atexit.register(self.close)
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        a, b = self.hosts
        for h in self.hosts:
            _run("ip", "netns", "add", h.netns)
        # One end named after each namespace; created here, then moved into it.
        _run("ip", "link", "add", a.netns, "type", "veth", "peer", "name", b.netns)
        for h in self.hosts:
            _run("ip", "link", "set", h.netns, "netns", h.netns)
            _run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/30", "dev", h.netns)
            _run("ip", "-n", h.netns, "link", "set", "lo", "up")
            _run("ip", "-n", h.netns, "link", "set", h.netns, "up")
            _run(
                "tc", "-n", h.netns, "qdisc", "add", "dev", h.netns, "root", "tbf",
                "rate", self.link["rate"], "burst", self.link["burst"],
                "latency", self.link["latency"],
            )  # fmt: skip
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{a.netns[:-1]}-"))
        for h in self.hosts:
            h.holder = subprocess.Popen(
                [sys.executable, __file__, "hold", h.netns, str(self.shm_bytes)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert h.holder.stdout is not None
            line = h.holder.stdout.readline().strip()  # the init's pid, or EOF on failure
            if not line.isdigit():
                h.holder.wait(START_TIMEOUT_S)
                err = h.holder.stderr.read().strip() if h.holder.stderr else ""
                raise HostsUnavailableError(f"host {h.name}: namespaces refused: {err}")
            h.init_pid = int(line)

    def popen(self, host: Host, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in `host` (cwd: this process's, or `cwd=`), as subprocess.Popen would;
        the pid returned is its wrapper: signals to it reach `cmd`, SIGKILL kills both."""
        if self._closed:
            raise RuntimeError("the hosts are closed")
        cwd = str(kwargs.pop("cwd", os.getcwd()))
        wrapper = [sys.executable, __file__, "enter", str(host.init_pid), cwd, "--", *cmd]
        return subprocess.Popen(wrapper, **kwargs)

    def start_call(self, host: Host, fn: Any, *args: Any, **kwargs: Any) -> HostCall:
        """Start `fn(*args, **kwargs)` in a new Python process in `host`; `fn` must be a
        module-level function, its arguments and result picklable."""
        assert self._tmp is not None, "the hosts are not open"
        job = Path(tempfile.mkstemp(dir=self._tmp, suffix=".call")[1])
        job.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args, kwargs)))
        log = open(job.with_suffix(".log"), "w+")  # noqa: SIM115 - closed by HostCall
        proc = self.popen(
            host, [sys.executable, __file__, "call", str(job)], stdout=log, stderr=log
        )
        return HostCall(proc, job, log)

    def call(self, host: Host, fn: Any, *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` run in `host`, its result here (HostCallError if it raised)."""
        return self.start_call(host, fn, *args, **kwargs).result(timeout)

    def close(self) -> None:
        """Kill every process of both hosts, delete the namespaces (and with them the link).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for h in self.hosts:
            if h.init_pid and _alive(h.init_pid):
                os.kill(h.init_pid, signal.SIGKILL)  # the kernel kills all of the host's pids
            if h.holder is not None:
                try:
                    h.holder.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    h.holder.kill()
                    h.holder.wait()
                for stream in (h.holder.stdout, h.holder.stderr):
                    if stream is not None:
                        stream.close()
        # What is left in the namespaces: wrappers whose command died with its host.
        mine = {self.a.netns, self.b.netns}
        _remove([n for n in namespaces() if n in mine], [n for n in links() if n in mine])
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def exists(self) -> bool:
        """Whether any namespace, link or init process of these hosts is still there."""
        mine = {self.a.netns, self.b.netns}
        return bool(
            mine & set(namespaces())
            or mine & set(links())
            or any(h.init_pid and _alive(h.init_pid) for h in self.hosts)
        )


@dataclasses.dataclass
class HostCall:
    """A function running in a host (`TwoHosts.start_call`)."""

    proc: subprocess.Popen[bytes]
    job: Path
    log: IO[str]

    def done(self) -> bool:
        """Whether its process has exited."""
        return self.proc.poll() is not None

    def cancel(self) -> None:
        """Kill it (and its wrapper) now."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def result(self, timeout: float = 120.0) -> Any:
        """Wait for the call; its result, or HostCallError with its traceback or output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise HostCallError(f"no result after {timeout:g} s: {self._output()}") from None
        out = self.job.with_name(self.job.name + ".out")
        if not out.exists():
            raise HostCallError(f"exited with {self.proc.returncode}: {self._output()}")
        status, value = pickle.loads(out.read_bytes())
        self.log.close()
        if status != "ok":
            raise HostCallError(value)
        return value

    def _output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read()[-4000:]
        self.log.close()
        return text


def main(argv: list[str]) -> int:
    """`hold NETNS SHM_BYTES` | `enter INIT_PID CWD -- CMD...` | `call JOB_FILE`."""
    if argv[:1] == ["hold"]:
        return hold(argv[1], int(argv[2]))
    if argv[:1] == ["enter"] and argv[3:4] == ["--"]:
        return enter(int(argv[1]), argv[2], argv[4:])
    if argv[:1] == ["call"]:
        return _call(argv[1])
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
