"""Processes the benchmark starts, and what /proc says about them.

Every server runs in its own session (process group) so that stopping it also stops
its workers; `Supervisor.stop_all` runs at exit, on Ctrl-C and on SIGTERM.
CPU time is utime+stime from /proc/<pid>/stat summed over the process and its
children (nginx and Apache workers); peak RSS is VmHWM from /proc/<pid>/status,
reset before each measurement by writing 5 to /proc/<pid>/clear_refs.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import ssl

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A server did not come up; the message names it and quotes its log."""


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class Proc:
    """One started server: its command, log file and port."""

    def __init__(self, name, argv, log, port, env=None):
        self.name, self.argv, self.log, self.port = name, argv, log, port
        self.popen = None
        self.env = env

    @property
    def pid(self):
        return self.popen.pid

    def start(self):
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=self.env)
        out.close()

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def wait_listening(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(
                    f"{self.name} exited with status {self.popen.returncode}; "
                    f"its log ({self.log}):\n{log_tail(self.log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise StartError(f"{self.name} did not listen on 127.0.0.1:{self.port} "
                         f"within {timeout:.0f} s; its log ({self.log}):\n{log_tail(self.log)}")

    def stop(self):
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=5)

    # What /proc says, for this process and its children.

    def tree(self):
        return process_tree(self.pid)

    def cpu_seconds(self):
        return sum(cpu_seconds(p) for p in self.tree())

    def reset_peak_rss(self):
        for p in self.tree():
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss_kib(self):
        return sum(status_kib(p, "VmHWM") for p in self.tree())

    def rss_kib(self):
        return sum(status_kib(p, "VmRSS") for p in self.tree())


class Supervisor:
    """Starts servers and stops every one of them, whatever happens."""

    def __init__(self):
        self.procs = []
        self._stopping = False

    def start(self, proc, ready_timeout=30.0):
        self.procs.append(proc)
        proc.start()
        proc.wait_listening(ready_timeout)
        return proc

    def stop_all(self):
        if self._stopping:
            return
        self._stopping = True
        for proc in reversed(self.procs):
            proc.stop()


def process_tree(root):
    """`root` and its descendants (nginx/Apache workers), from /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: field 3 is state, so utime (14) and stime (15) are
    # at offsets 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Probe:
    """CPU time and peak RSS of one server across one measurement.

    `sample_rss=True` also samples VmRSS every 20 ms, to see whether memory stays
    flat during a long transfer (VmHWM alone cannot tell growth from a spike).
    """

    def __init__(self, proc, sample_rss=False):
        self.proc = proc
        self.sample_rss = sample_rss
        self.samples = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.proc.reset_peak_rss()
        self.rss_before_kib = self.proc.rss_kib()
        self.cpu_before = self.proc.cpu_seconds()
        if self.sample_rss:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.samples.append(self.proc.rss_kib())

    def __exit__(self, *exc):
        self.cpu = self.proc.cpu_seconds() - self.cpu_before
        self.peak_rss_kib = self.proc.peak_rss_kib()
        if self._thread:
            self._stop.set()
            self._thread.join()
        self.max_sampled_kib = max(self.samples, default=self.rss_before_kib)
        return False


def http_get(url, cafile=None, headers=None, method="GET", timeout=10):
    """(status, headers, body) of one request; 4xx/5xx are returned, not raised."""
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_http(url, proc, cafile=None, timeout=30.0, ok=(200,), headers=None):
    """Wait until `url` answers with one of `ok` (the server may listen before it serves)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited; its log ({proc.log}):\n{log_tail(proc.log)}")
        try:
            status, _, body = http_get(url, cafile=cafile, timeout=2, headers=headers)
            if status in ok:
                return
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise StartError(f"{proc.name}: {url} did not answer {ok} within {timeout:.0f} s "
                     f"(last: {last}); its log ({proc.log}):\n{log_tail(proc.log)}")


class PerfProfiler:
    """`perf record` (flat, 1999 Hz) on the gate's process while it is measured.

    One data file per scenario and front (the last round wins); `report` gives the
    hottest symbols, kernel and user space together.
    """

    def __init__(self, dir, fronts=("gate", "gate-aio", "gate-cache")):
        self.dir, self.fronts = dir, fronts
        os.makedirs(dir, exist_ok=True)
        self.files = {}

    def start(self, key, front):
        if front.name not in self.fronts:
            return None
        path = f"{self.dir}/{key}-{front.name}.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-p", str(front.proc.pid),
                                 "-o", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)   # let it attach before the load starts
        self.files[(key, front.name)] = path
        return perf

    @staticmethod
    def stop(perf):
        if perf is None:
            return
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(timeout=30)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait()

    # (component, pattern on "dso symbol"), first match wins.
    COMPONENTS = [
        ("TLS crypto (ring)", r"ring|aes|gcm|GFp|sha256|sha512|p256|ecp_nistz|bn_|chacha|poly1305|x25519"),
        ("rustls", r"rustls"),
        ("hyper, h2, http", r"hyper|\bh2::|http::|httparse|http_body"),
        ("tokio, mio", r"tokio|mio::"),
        ("registry-gate code", r"registry_gate"),
        ("Rust std, futures, bytes", r"futures|core::|alloc::|std::|bytes::|\[\.\] _?ZN"),
        ("malloc/free", r"libc.*(malloc|free|_int_|realloc|calloc|tcache)"),
        ("memcpy/memmove", r"mem(move|cpy|set)"),
        ("kernel: TCP/IP, sockets", r"\[k\].*(tcp|ip_|skb|sock|inet|netif|net_rx|loopback|"
                                    r"dev_queue|napi|__release_sock|copy_(to|from)_user|copyout|"
                                    r"copyin|_copy_|csum)"),
        ("kernel: scheduling, futex, epoll", r"\[k\].*(sched|task_switch|futex|ep_|epoll|"
                                             r"_raw_spin|wake|idle|pick_next|enqueue|dequeue)"),
        ("kernel: files, paths", r"\[k\].*(path|d_lookup|inode|statx|vfs_|filemap|ext4|"
                                 r"open|getname|strncpy_from_user|walk_component|step_into|"
                                 r"dentry|page_cache|folio)"),
        ("kernel: syscall entry/exit", r"\[k\].*(syscall|entry_|exit_to_user|__x64_sys|"
                                       r"fdget|fput|__fget)"),
        ("kernel: other", r"\[k\]"),
        ("other user space", r"."),
    ]

    def report(self, key, front_name, top=8):
        """Share of samples per component, then the hottest symbols."""
        path = self.files.get((key, front_name))
        if not path:
            return ""
        out = subprocess.run(["perf", "report", "-i", path, "--stdio", "--no-children", "-q",
                              "--sort", "dso,sym"], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].endswith("%"):
                rows.append((float(parts[0][:-1]), " ".join(parts[1].split())))
        if not rows:
            return ""
        shares = {}
        for pct, what in rows:
            for name, pattern in self.COMPONENTS:
                if re.search(pattern, what):
                    shares[name] = shares.get(name, 0.0) + pct
                    break
        lines = ["by component: " + ", ".join(
            f"{name} {pct:.0f}%" for name, pct in sorted(shares.items(), key=lambda x: -x[1])
            if pct >= 1)]
        lines += [f"{pct:5.1f}%  {what[:110]}" for pct, what in rows[:top]]
        return "\n".join(lines)
