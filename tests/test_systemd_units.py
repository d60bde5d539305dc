"""The systemd units (systemd/fedmfs-*.service): hardened, valid, and the services still run in them.

systemd is not PID 1 where these tests run (a container), so ``systemd-run`` cannot start the units.
Three checks instead:

* ``systemd-analyze security --offline=true``: the exposure of each unit is at most 2.5;
* ``systemd-analyze verify``: the unit files parse without unknown keys or groups (ExecStart stubbed);
* the sandbox from inside: :func:`sandbox_main` applies the unit's sandbox without systemd (a private
  mount namespace with ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices, ProtectProc /
  ProcSubset, ProtectKernelTunables/Logs; a user without capabilities, NoNewPrivileges, UMask, Nice;
  seccomp filters for SystemCallFilter / SystemCallErrorNumber / SystemCallArchitectures=native,
  MemoryDenyWriteExecute and RestrictAddressFamilies, built from the unit's own lines and the
  syscall groups of ``systemd-analyze syscall-filter``) and the real coordinator and edge daemon run a
  full round in it over Mosquitto, each sending READY=1 to a notify socket. Not emulated: PrivateUsers,
  RestrictNamespaces, RestrictRealtime, RestrictSUIDSGID, LockPersonality, ProtectClock's device
  rule, ProtectHostname, KeyringMode, RemoveIPC (they only refuse what the services never do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"coordinator": ROOT / "systemd" / "fedmfs-coordinator.service",
         "edge": ROOT / "systemd" / "fedmfs-edge.service"}
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
MAX_EXPOSURE = 2.5


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` (a key may repeat; continuation lines are not used)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert section is not None, f"{path}: {raw!r} outside a section"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def _svc(name: str) -> dict[str, list[str]]:
    return parse_unit(UNITS[name])["Service"]


def _last(svc: dict[str, list[str]], key: str) -> str | None:
    return svc[key][-1] if key in svc else None


# --- what the services need -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_keep_what_the_services_need(name):
    svc = _svc(name)
    assert _last(svc, "Type") == "notify" and _last(svc, "NotifyAccess") == "main"
    assert int(_last(svc, "WatchdogSec")) > 0
    assert _last(svc, "User") == "fedmfs" and _last(svc, "Group") == "fedmfs"
    assert _last(svc, "StateDirectory") == f"fedmfs-{name}"
    assert _last(svc, "ExecStart").startswith(f"/opt/fedmfs/bin/fedmfs-{name} run --config /etc/fedmfs/")
    # MQTT over TCP to a broker that may be on another host, sd_notify over AF_UNIX
    assert set(_last(svc, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "PrivateNetwork" not in svc and "IPAddressDeny" not in svc
    # onnxruntime / torch: threads and mmap stay allowed; the groups they need are not removed
    filt = " ".join(svc["SystemCallFilter"])
    for group in ("@process", "@memlock", "@network-io", "@basic-io", "@file-system", "@ipc"):
        assert group not in filt


HARDENING = {
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    "RestrictSUIDSGID": "yes", "PrivateUsers": "yes", "RemoveIPC": "yes", "KeyringMode": "private",
    "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
    "DevicePolicy": "closed", "PrivateMounts": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectProc": "invisible", "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes", "LockPersonality": "yes",
    "SystemCallArchitectures": "native", "SystemCallErrorNumber": "EPERM", "UMask": "0077",
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_hardened(name):
    svc = _svc(name)
    got = {k: _last(svc, k) for k in HARDENING}
    assert got == HARDENING
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # ProcSubset=pid only where nothing reads /proc/cpuinfo: the edge runs onnxruntime and torch
    assert _last(svc, "ProcSubset") == ("pid" if name == "coordinator" else None)
    # MemoryDenyWriteExecute=yes only where torch does not train: oneDNN's kernels are generated (W+X)
    assert _last(svc, "MemoryDenyWriteExecute") == ("yes" if name == "coordinator" else None)
    # ProtectSystem=strict already makes the data read-only; a missing ReadOnlyPaths= would stop the unit
    assert "ReadOnlyPaths" not in svc and "ReadWritePaths" not in svc


# --- systemd-analyze --------------------------------------------------------------------------------

def _need_analyze():
    if not Path(ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed (Debian package systemd): cannot rate the units")


def exposure(unit: Path) -> tuple[float, str]:
    """The overall exposure ``systemd-analyze security --offline=true`` gives ``unit``, and its report."""
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert m, f"no exposure figure in: {out.stdout}\n{out.stderr}"
    return float(m.group(1)), out.stdout


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exposure_is_at_most_2_5(name):
    _need_analyze()
    value, report = exposure(UNITS[name])
    print(f"systemd-analyze security --offline=true {UNITS[name].name}: {value}")
    assert value <= MAX_EXPOSURE, report
    # the same through systemd-analyze's own gate (exit status non-zero above the threshold)
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", f"--threshold={int(MAX_EXPOSURE * 10)}",
                          str(UNITS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_verify(name, tmp_path):
    """``systemd-analyze verify``: no unknown key, syscall group or bad value (the binary is a stub)."""
    _need_analyze()
    stub = tmp_path / "bin" / f"fedmfs-{name}"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / UNITS[name].name
    unit.write_text(UNITS[name].read_text().replace("/opt/fedmfs/bin/", f"{stub.parent}/"))
    out = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr


# --- the sandbox from inside ----------------------------------------------------------------------

_CLONE_NEWNS = 0x20000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 4, 6, 7
# systemd allows these whatever the filter says (systemd.exec(5), SystemCallFilter=)
_IMPLICIT = ["execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn", "clock_gettime",
             "clock_gettime64", "gettimeofday", "time", "nanosleep", "clock_nanosleep", "clock_nanosleep_time64"]
_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}


def _scmp_errno(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _syscall_group(name: str, cache: dict[str, set[str]]) -> set[str]:
    """The system calls of a ``@group`` (nested groups expanded), from ``systemd-analyze syscall-filter``."""
    if name in cache:
        return cache[name]
    out = subprocess.run([ANALYZE, "syscall-filter", "--no-pager", name], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _syscall_group(item, cache) if item.startswith("@") else {item}
    cache[name] = calls
    return calls


def syscall_allowlist(svc: dict[str, list[str]]) -> list[str]:
    """The allow list the unit's SystemCallFilter= lines make (first line an allow list, ``~`` removes)."""
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for i, value in enumerate(svc["SystemCallFilter"]):
        deny = value.startswith("~")
        assert (i == 0) != deny, "only an allow list on the first line, then ~removals, is emulated"
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _syscall_group(item, cache) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return sorted(allowed | set(_IMPLICIT))


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(libc, src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} {target} {fstype} {flags:#x} {data}: {os.strerror(e)}")


def _seccomp(spec: dict) -> None:
    """Load the unit's seccomp filters as systemd does: one filter per directive, the allow list last."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def load(default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> None:
        ctx = lib.seccomp_init(default)     # the native architecture only: SystemCallArchitectures=native
        assert ctx
        try:
            for action, name, conds in rules:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:      # not a system call of this architecture (the groups list all of them)
                    continue
                arr = (_ArgCmp * max(1, len(conds)))(*[_ArgCmp(*c) for c in conds])
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
                if rc < 0 and -rc not in (errno.EEXIST,):
                    raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")
            rc = lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            lib.seccomp_release(ctx)

    if spec["mdwe"]:    # MemoryDenyWriteExecute=yes: systemd's rules (seccomp-util.c)
        prot_exec, prot_write, shm_exec = 4, 2, 0o100000
        eperm = _scmp_errno(errno.EPERM)
        load(_SCMP_ACT_ALLOW, [
            (eperm, "mmap", [(2, _SCMP_CMP_MASKED_EQ, prot_exec | prot_write, prot_exec | prot_write)]),
            (eperm, "mprotect", [(2, _SCMP_CMP_MASKED_EQ, prot_exec, prot_exec)]),
            (eperm, "pkey_mprotect", [(2, _SCMP_CMP_MASKED_EQ, prot_exec, prot_exec)]),
            (eperm, "shmat", [(2, _SCMP_CMP_MASKED_EQ, shm_exec, shm_exec)]),
        ])
    if spec["families"]:    # RestrictAddressFamilies= (an allow list): socket() of any other family
        allowed = sorted(spec["families"])
        refuse = _scmp_errno(errno.EAFNOSUPPORT)
        rules = [(refuse, "socket", [(0, _SCMP_CMP_EQ, f, 0)]) for f in range(allowed[-1]) if f not in allowed]
        rules.append((refuse, "socket", [(0, _SCMP_CMP_GT, allowed[-1], 0)]))
        load(_SCMP_ACT_ALLOW, rules)
    # SystemCallFilter= + SystemCallErrorNumber=, last as systemd does (it forbids seccomp() itself)
    load(_scmp_errno(getattr(errno, spec["syscall_errno"])), [(_SCMP_ACT_ALLOW, n, []) for n in spec["allow"]])


def sandbox_main(spec: dict, argv: list[str]) -> None:
    """Apply the unit's sandbox to this process (root, in a fresh mount namespace), then exec ``argv``."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    keep = {p: os.open(p, os.O_PATH) for p in spec["keep_ro"] + spec["keep_rw"]}
    devs = {d: os.open(f"/dev/{d}", os.O_PATH) for d in ("null", "zero", "full", "random", "urandom", "tty")}
    # ProtectSystem=strict: every mount read-only (deepest last, so a parent's remount hides nothing)
    flags = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
    points: dict[str, int] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mp = fields[4].replace("\\040", " ")
        if not mp.startswith(("/proc", "/dev")):    # replaced below
            points[mp] = sum(flags.get(o, 0) for o in fields[5].split(","))   # kept: they may be locked
    for mp in sorted(points, key=lambda p: p.count("/")):
        _mount(libc, None, mp, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | points[mp])
    # PrivateTmp=, ProtectHome= (an empty, read-only tmpfs), PrivateDevices=
    for d in ("/tmp", "/var/tmp"):
        _mount(libc, "tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    for d in ("/root", "/home", "/run/user"):
        if os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    _mount(libc, "tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755")
    for d, fd in devs.items():
        Path(f"/dev/{d}").touch()
        _mount(libc, f"/proc/self/fd/{fd}", f"/dev/{d}", None, _MS_BIND)
    os.mkdir("/dev/shm")
    _mount(libc, "tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    # what the service may see under those tmpfs: the interpreter (read-only), its state (read-write)
    for p, fd in keep.items():
        os.makedirs(p, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC)
        ro = _MS_RDONLY if p in spec["keep_ro"] else 0
        _mount(libc, None, p, None, _MS_REMOUNT | _MS_BIND | ro | _MS_NOSUID | _MS_NODEV)
        os.close(fd)
    for d in ("/root", "/home", "/run/user", "/dev"):
        if os.path.isdir(d):
            _mount(libc, None, d, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
                   | (_MS_NOEXEC if d == "/dev" else 0))
    # ProtectProc= / ProcSubset=: a proc instance of our own; ProtectKernelTunables/Logs on top of it
    opts = f"hidepid={spec['protect_proc']}" + (f",subset={spec['proc_subset']}" if spec["proc_subset"] else "")
    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts)
    if not spec["proc_subset"]:
        for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"):
            if os.path.exists(p):
                _mount(libc, p, p, None, _MS_BIND | _MS_REC)
                _mount(libc, None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        if os.path.exists("/proc/kmsg"):
            _mount(libc, "/dev/null", "/proc/kmsg", None, _MS_BIND)
    os.chdir("/")
    # User=, Group= (no supplementary groups), Nice=, UMask=, NoNewPrivileges=, CapabilityBoundingSet=
    if spec["nice"]:
        os.setpriority(os.PRIO_PROCESS, 0, spec["nice"])
    os.umask(int(spec["umask"], 8))
    for cap in range(cap_last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    _seccomp(spec)
    os.execve(argv[0], argv, spec["env"])


def sandbox_spec(name: str, uid: int, gid: int, state_dirs: list[str], env: dict[str, str]) -> dict:
    """What :func:`sandbox_main` applies for unit ``name`` (read from the unit file)."""
    svc = _svc(name)
    families = [_FAMILIES[f] for f in _last(svc, "RestrictAddressFamilies").split()]
    prefix = os.path.realpath(sys.prefix)
    return {
        "uid": uid, "gid": gid, "env": env, "umask": _last(svc, "UMask"), "nice": int(_last(svc, "Nice") or 0),
        "protect_proc": _last(svc, "ProtectProc"), "proc_subset": _last(svc, "ProcSubset"),
        "allow": syscall_allowlist(svc), "syscall_errno": _last(svc, "SystemCallErrorNumber"),
        "mdwe": _last(svc, "MemoryDenyWriteExecute") == "yes", "families": families,
        # the interpreter of this test run may live under /root (pyenv); in production it is /opt/fedmfs
        "keep_ro": sorted({prefix, str(ROOT)}), "keep_rw": state_dirs,
    }


def _sandbox_usable() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox check needs root (mount namespaces, setuid) like systemd itself"
    if not ctypes.util.find_library("seccomp") and not Path("/usr/lib/x86_64-linux-gnu/libseccomp.so.2").exists():
        return "libseccomp is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/mnt"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a mount namespace here: {probe.stderr.strip()}"
    return None


class NotifySocket:
    """An abstract AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self):
        self.name = f"@fedmfs-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def fields(self) -> set[str]:
        return {f for m in list(self.messages) for f in m.split("\n")}

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


_PROBE = r"""
import json, mmap, os, socket
out = {"uid": os.getuid(), "umask": os.umask(0o077), "cpuinfo": os.path.exists("/proc/cpuinfo"),
       "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()), "home": os.listdir("/home"),
       "dev": sorted(os.listdir("/dev")), "tmp": sorted(os.listdir("/tmp"))}
def err(f):
    try:
        f()
        return None
    except OSError as e:
        return e.errno
out["write_etc"] = err(lambda: open("/etc/fedmfs-sandbox-probe", "w"))
out["write_state"] = err(lambda: open(os.environ["HOME"] + "/probe", "w").close())
out["netlink"] = err(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
out["inet"] = err(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
out["wx_mmap"] = err(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
out["setpriority"] = err(lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))
out["chroot"] = err(lambda: os.chroot("/"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_sandbox_is_applied(name, tmp_path):
    """The emulation is not vacuous: inside it the unit's restrictions hold."""
    why = _sandbox_usable()
    if why:
        pytest.skip(why)
    os.chmod(tmp_path, 0o755)
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(sandbox_spec(name, 65534, 65534, [str(state)],
                                                 {"PATH": "/usr/bin:/bin", "HOME": str(state)})))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_file), "--", sys.executable,
                          "-c", _PROBE], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["uid"] == 65534 and got["umask"] == 0o077 and got["home"] == []
    assert got["pids"] == [str(p) for p in sorted(int(x) for x in got["pids"])] and len(got["pids"]) == 1
    assert got["cpuinfo"] is (name != "coordinator")                       # ProcSubset=pid
    assert not {"vda", "kmsg", "kvm", "loop0", "rtc0"} & set(got["dev"])    # PrivateDevices=
    if tmp_path.is_relative_to("/tmp"):   # PrivateTmp=: only the state directory bound into it
        assert got["tmp"] == [tmp_path.relative_to("/tmp").parts[0]]
    assert got["write_etc"] == errno.EROFS and got["write_state"] is None     # ProtectSystem=strict
    assert got["netlink"] == errno.EAFNOSUPPORT and got["inet"] is None      # RestrictAddressFamilies=
    assert got["wx_mmap"] == (errno.EPERM if name == "coordinator" else None)  # MemoryDenyWriteExecute=
    assert got["setpriority"] == errno.EPERM and got["chroot"] == errno.EPERM  # ~@resources, ~@privileged


@pytest.mark.integration
def test_the_services_run_a_round_in_their_units_sandbox(mosquitto, tmp_path):
    """The real coordinator and edge daemon, each in its unit's sandbox (applied from inside, see the
    module docstring), run a whole round over Mosquitto: READY=1 and watchdog pings reach the notify
    socket, training (torch), the ONNX export, Shapley (onnxruntime) and the ledger (SQLite) all work."""
    why = _sandbox_usable()
    if why:
        pytest.skip(why)
    from fedmfs.core.data.format import Fleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.settings import TrainConfig
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.processes import write_fleet_configs

    f = make_synthetic("small", 0)
    fleet = Fleet(f.spec, [f.clients[0]], f.metadata)
    cfg = SimConfig.build(rounds=1, gamma=2, seed=3,
                          train=TrainConfig(min_steps=0, epochs=1, fusion_steps=10, shapley_samples=5))
    work = tmp_path / "run"
    (work / "logs").mkdir(parents=True)
    files = write_fleet_configs(fleet, cfg, work, mosquitto.url, "sandbox", round_seconds=120)
    (work / "coordinator").mkdir()
    (work / "edge").mkdir()
    uid = gid = 65534   # nobody: a user without any privilege, like fedmfs
    for p in [work, *work.rglob("*")]:
        os.chown(p, uid, gid)
    os.chmod(tmp_path, 0o755)
    base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": "fedmfs", "LOGNAME": "fedmfs",
                "PYTHONUNBUFFERED": "1", "WATCHDOG_USEC": "5000000"}
    me = Path(__file__).resolve()
    procs: dict[str, subprocess.Popen] = {}
    sockets: dict[str, NotifySocket] = {}
    try:
        for name, args, state in (
                ("coordinator", ["fedmfs.coordinator.cli", "run", "--config", str(files["coordinator"])],
                 work / "coordinator"),
                ("edge", ["fedmfs.edge.cli", "run", "--config", str(next(iter(files["edges"].values())))],
                 work / "edge")):
            sockets[name] = NotifySocket()
            env = dict(base_env, HOME=str(state), STATE_DIRECTORY=str(state), NOTIFY_SOCKET=sockets[name].name)
            spec = sandbox_spec(name, uid, gid, [str(work)], env)
            spec_file = tmp_path / f"{name}.sandbox.json"
            spec_file.write_text(json.dumps(spec))
            log = open(work / "logs" / f"{name}.log", "ab")
            procs[name] = subprocess.Popen(
                [sys.executable, str(me), str(spec_file), "--", sys.executable, "-m", *args,
                 "--exit-when-done", "--connect-timeout", "60"],
                stdout=log, stderr=log, cwd="/")
        for name, p in procs.items():
            try:
                rc = p.wait(280)
            except subprocess.TimeoutExpired:
                rc = None
            log = (work / "logs" / f"{name}.log").read_text(errors="replace")
            assert rc == 0, f"{name} exited {rc} in its sandbox:\n{log[-4000:]}"
        # ProcSubset=pid hides /proc/cpuinfo from the coordinator only: torch says so once at import
        assert "cpuinfo" not in (work / "logs" / "edge.log").read_text(errors="replace")
        for name, s in sockets.items():
            got = s.fields()
            assert "READY=1" in got and "WATCHDOG=1" in got and "STOPPING=1" in got, (name, got)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for s in sockets.values():
            s.close()
    # the round happened: the edge uploaded, the coordinator aggregated and wrote its ledger in the sandbox
    from fedmfs.coordinator.ledger import Ledger

    led = Ledger(work / "coordinator", readonly=True)
    try:
        assert led.uploads(0), "no upload accepted in round 0"
    finally:
        led.close()
    # UMask=0077: what the services wrote is theirs alone
    assert (work / "coordinator" / "ledger.sqlite").stat().st_mode & 0o077 == 0


if __name__ == "__main__":   # python3 test_systemd_units.py SPEC.json -- COMMAND...: exec COMMAND in the sandbox
    _spec = json.loads(Path(sys.argv[1]).read_text())
    assert sys.argv[2] == "--"
    sandbox_main(_spec, sys.argv[3:])
