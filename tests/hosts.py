"""Hosts on one machine: Linux network namespaces, each with its own address on one bridge.

`Network(names)` makes a namespace per host and one more for the switch: a bridge, with a veth pair
from each host's `eth0` to a port on the bridge. Hosts reach each other only through their
interfaces and the switch; the machine's own namespace has no interface on that network, so
nothing else reaches them and they reach nothing else. `Network.close()` (also on failure) kills
every process running in a host's namespace, whoever started it, deletes the namespaces, which
deletes their interfaces, and removes each host's folder under /tmp.

Making namespaces needs root and iproute2's `ip`; `unavailable()` says why not where it cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"dfcprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace: `name`, its `address` on the network, the switch port its cable plugs into."""

    name: str
    address: str
    port: str
    switch: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    interface: str = "eth0"

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
        """Run `cmd` on this host to its end; its output, or AssertionError with it."""
        result = subprocess.run(self.command(cmd), env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{self.name}: {cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start `cmd` on this host in its own process group, output into `log`; stopped by close()."""
        with log.open("w") as handle:
            process = subprocess.Popen(
                self.command(cmd), env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        return process

    def cable(self, plugged: bool) -> None:
        """Plug or pull this host's cable: its switch port up or down, as a cut cable or a dead port."""
        _ip("-n", self.switch, "link", "set", self.port, "up" if plugged else "down")

    def listening(self) -> list[tuple[str, str]]:
        """(local address:port, process) of every TCP socket listening on this host."""
        out = subprocess.run(
            self.command(["ss", "-Hltnp"]), capture_output=True, text=True, check=True
        ).stdout.splitlines()
        return [(line.split()[3], line.split("users:", 1)[-1]) for line in out if line.strip()]

    def connections(self) -> list[tuple[str, str, str]]:
        """(local, peer, process) of every established TCP connection on this host."""
        out = subprocess.run(
            self.command(["ss", "-Htnp", "state", "established"]), capture_output=True, text=True, check=True
        ).stdout.splitlines()
        return [(p[2], p[3], line.split("users:", 1)[-1]) for line in out if len(p := line.split()) >= 4]

    @property
    def scratch(self) -> Path:
        """This host's own folder (Ray's temp folder: its sockets need a short path)."""
        return Path("/tmp") / self.name

    def stop(self) -> None:
        """Kill every process in this host's namespace: those start() started, their children
        (a dead leader's too), and any other."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        inside = _ip("netns", "pids", self.name, check=False).stdout.split()
        for pid in inside:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait(timeout=30)
        self.processes.clear()


class Network:
    """Hosts `names` on one switch, addresses 10.<n>.<m>.1, .2, ... in order (a /24 chosen per process)."""

    def __init__(self, names: list[str]):
        tag = f"dfc{os.getpid() % 100000}"
        self.switch = f"{tag}-sw"
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.hosts: dict[str, Host] = {}
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names, start=1):
                host = Host(f"{tag}-{name}", f"{subnet}.{i}", f"{tag}{name}p", self.switch)
                _ip("netns", "add", host.name)
                self.hosts[name] = host  # from here on close() deletes it
                _ip(
                    "link",
                    "add",
                    host.port,
                    "netns",
                    self.switch,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.name,
                )
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()
            shutil.rmtree(host.scratch, ignore_errors=True)
            _ip("netns", "del", host.name, check=False)
        _ip("netns", "del", self.switch, check=False)
