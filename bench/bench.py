#!/usr/bin/env python3
"""flr benchmark driver: backups and mounted reads, flr side by side with the
native filesystem, restic, borg and casync, written out as one Markdown report.

Normally started by bench/run.sh, which installs the tools, builds flr and
generates the dataset first.  Subcommands:

  bench.py run ...            the whole benchmark (see --help)
  bench.py sqlite-probe ...   internal: SQLite lookups / aggregate on one file,
                              run in a child process so it can be timed out

Standard library only.
"""

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_db  # noqa: E402  (page_diff, sha256_file)

MiB = 1 << 20
MB = 1_000_000
LOOKUPS = 1200
FLR_JOB = "bench"
CHUNKERS = ["auto", "fixed:4k", "fixed:64k", "cdc"]
PEERS = ["restic", "borg", "casync"]


def log(msg):
    ts = time.strftime("%H:%M:%S")
    print(f"[bench {ts}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A measurement that could not be made; the text ends up in the cell."""


# ---------------------------------------------------------------------------
# process bookkeeping: every process we start is registered so that run.sh's
# trap can end it by id if this driver dies without cleaning up.

class Registry:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.pid_file = os.path.join(run_dir, "pids")
        self.mnt_file = os.path.join(run_dir, "mounts")
        self.pids = set()
        self.mounts = set()

    def _write(self):
        with open(self.pid_file, "w") as f:
            f.write("".join(f"{p}\n" for p in sorted(self.pids)))
        with open(self.mnt_file, "w") as f:
            f.write("".join(f"{m}\n" for m in sorted(self.mounts)))

    def add_pid(self, pid):
        self.pids.add(pid)
        self._write()

    def drop_pid(self, pid):
        self.pids.discard(pid)
        self._write()

    def add_mount(self, mnt):
        self.mounts.add(mnt)
        self._write()

    def drop_mount(self, mnt):
        self.mounts.discard(mnt)
        self._write()


REG = None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def run(cmd, *, log_name, logs_dir, env=None, cwd=None, timeout=None, capture=False):
    """Runs cmd, returns dict(rc, wall, cpu, maxrss_mib, out, err_tail).

    Wall time is measured around fork/exit; CPU and peak RSS come from wait4."""
    out_path = os.path.join(logs_dir, log_name + ".out")
    err_path = os.path.join(logs_dir, log_name + ".err")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=full_env, cwd=cwd,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        REG.add_pid(p.pid)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if timeout and time.perf_counter() - t0 > timeout:
                timed_out = True
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    REG.drop_pid(p.pid)
    with open(err_path, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    res = {"rc": p.returncode, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
           "maxrss_mib": ru.ru_maxrss / 1024.0, "timed_out": timed_out,
           "err_tail": err.strip().splitlines()[-3:] if err.strip() else []}
    if capture:
        with open(out_path, "rb") as f:
            res["out"] = f.read().decode("utf-8", "replace")
    return res


def first_error_line(res, default="failed"):
    if res.get("timed_out"):
        return "timed out"
    lines = [ln for ln in res.get("err_tail", []) if ln.strip()]
    if lines:
        return f"rc {res['rc']}: {lines[-1].strip()[:120]}"
    return f"{default} (rc {res['rc']})"


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def du_bytes(path):
    r = subprocess.run(["du", "-sb", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"du failed: {r.stderr.strip()[:80]}")
    return int(r.stdout.split()[0])


def cmd_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        text = (r.stdout or r.stderr).strip().splitlines()
        return text[0] if text else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


# ---------------------------------------------------------------------------
# physical limit

class Zstd:
    """libzstd through ctypes: one-shot ZSTD_compress at a given level."""

    def __init__(self):
        name = ctypes.util.find_library("zstd") or "libzstd.so.1"
        self.lib = ctypes.CDLL(name)
        self.lib.ZSTD_compressBound.restype = ctypes.c_size_t
        self.lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        self.lib.ZSTD_compress.restype = ctypes.c_size_t
        self.lib.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                           ctypes.c_size_t, ctypes.c_int]
        self.lib.ZSTD_isError.restype = ctypes.c_uint
        self.lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        self.buf = ctypes.create_string_buffer(self.lib.ZSTD_compressBound(1 << 16))

    def compressed_size(self, data, level=3):
        n = self.lib.ZSTD_compress(self.buf, len(self.buf), data, len(data), level)
        if self.lib.ZSTD_isError(n):
            raise Failure("ZSTD_compress failed")
        return n


def physical_limit(ctx):
    meta = ctx.meta
    pages_path = os.path.join(ctx.work, "changed_pages.bin")
    diff = gen_db.page_diff(ctx.v1, ctx.v2, pages_out=pages_path)
    n = diff["pages_changed"]
    raw = n * gen_db.PAGE
    res = {"pages_changed": n, "raw_bytes": raw}
    try:
        z = Zstd()
        total = 0
        with open(pages_path, "rb") as f:
            while True:
                page = f.read(gen_db.PAGE)
                if not page:
                    break
                total += z.compressed_size(page, 3)
        res["per_page_bytes"] = total
        res["per_page_how"] = "libzstd ZSTD_compress level 3, each page its own frame"
    except (OSError, Failure) as e:
        res["per_page_error"] = str(e)
    r = subprocess.run(f"zstd -3 -q -c '{pages_path}' | wc -c", shell=True,
                       capture_output=True, text=True)
    res["concat_bytes"] = int(r.stdout.strip()) if r.returncode == 0 else None
    r = subprocess.run(f"zstd -3 -q -T0 -c '{ctx.v1}' | wc -c", shell=True,
                       capture_output=True, text=True)
    res["db_zstd3_bytes"] = int(r.stdout.strip()) if r.returncode == 0 else None
    res["db_bytes"] = meta["bytes"]
    os.unlink(pages_path)
    return res


# ---------------------------------------------------------------------------
# backup tools

class Tool:
    name = "?"
    label_full = "full"
    label_incr = "incr"

    def __init__(self, ctx):
        self.ctx = ctx
        self.repo = os.path.join(ctx.repos, self.name)
        # where the repository's bytes live on this machine (for S3: the
        # server's directory of the bucket prefix)
        self.store_dir = self.repo

    def env(self):
        return {}

    def marker_path(self):
        """Where a finished backup of the dataset is recorded (None: never reused)."""
        return os.path.join(self.store_dir, ".bench-dataset")

    def counter(self):
        """Request counters of the path to the repository (None: not counted)."""
        return None

    def init_cmd(self):
        raise NotImplementedError

    def backup_cmd(self, label):
        raise NotImplementedError

    def stored_bytes(self):
        return du_bytes(self.store_dir)


class Restic(Tool):
    name = "restic"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.cache = os.path.join(ctx.work, "cache", "restic")

    def env(self):
        return {"RESTIC_PASSWORD": "x"}

    def base(self):
        return ["restic", "--repo", self.repo, "--cache-dir", self.cache]

    def init_cmd(self):
        return self.base() + ["init"]

    def backup_cmd(self, label):
        return self.base() + ["backup", "--tag", label, "bench.db"]

    def mount_cmd(self, mnt):
        return self.base() + ["mount", mnt]

    def mount_file(self, mnt):
        return os.path.join(mnt, "snapshots", "latest", "bench.db")


class Borg(Tool):
    name = "borg"

    def env(self):
        return {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
                "BORG_BASE_DIR": os.path.join(self.ctx.work, "cache", "borg")}

    def init_cmd(self):
        return ["borg", "init", "-e", "none", self.repo]

    def backup_cmd(self, label):
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::{label}", "bench.db"]

    def mount_cmd(self, mnt):
        return ["borg", "mount", "-f", f"{self.repo}::{self.label_incr}", mnt]

    def mount_file(self, mnt):
        return os.path.join(mnt, "bench.db")


class Casync(Tool):
    name = "casync"

    def store(self):
        return os.path.join(self.repo, "store")

    def init_cmd(self):
        return ["mkdir", "-p", self.store()]

    def backup_cmd(self, label):
        return ["casync", "make", f"--store={self.store()}",
                os.path.join(self.repo, f"{label}.caibx"), self.ctx.src_file]

    def caidx(self):
        return os.path.join(self.repo, "mount.caidx")

    def mount_prepare_cmd(self):
        # `casync mount` takes archives (.caidx) only, not blob indexes
        # (.caibx), so the directory holding the updated db is archived into
        # the same store once more for the mount measurements (not timed).
        return ["casync", "make", f"--store={self.store()}", self.caidx(), self.ctx.src_dir]

    def mount_cmd(self, mnt):
        return ["casync", "mount", f"--store={self.store()}", self.caidx(), mnt]

    def mount_file(self, mnt):
        return os.path.join(mnt, "bench.db")


class Flr(Tool):
    def __init__(self, ctx, chunker="auto"):
        self.chunker = chunker
        self.name = "flr" if chunker == "auto" else "flr-" + chunker.replace(":", "-")
        super().__init__(ctx)

    def init_cmd(self):
        return [self.ctx.flr, "init", self.repo]

    def backup_cmd(self, label):
        cmd = [self.ctx.flr, "backup", "--repo", self.repo, "--job", FLR_JOB, "--quiet", "--json"]
        if self.chunker != "auto":
            cmd += ["--chunker", self.chunker]
        return cmd + [self.ctx.src_file]

    def mount_cmd(self, mnt):
        return [self.ctx.flr, "mount", "--repo", self.repo, mnt, "--background"]

    def mount_file(self, mnt):
        return os.path.join(mnt, FLR_JOB, "latest", "bench.db")


# ---------------------------------------------------------------------------
# backup measurements

def point_src(ctx, version_path):
    """Makes work/src/bench.db the given version (a hard link: same bytes,
    new inode and mtime for the tools' change detection, no copy)."""
    os.makedirs(ctx.src_dir, exist_ok=True)
    tmp = ctx.src_file + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.link(version_path, tmp)
    os.replace(tmp, ctx.src_file)


def run_backups(ctx, tool, timed=True):
    """Full (v1) then incremental (v2) into one fresh repository."""
    res = {}
    if os.path.exists(tool.store_dir):
        shutil.rmtree(tool.store_dir)
    if isinstance(tool, Restic) and os.path.exists(tool.cache):
        shutil.rmtree(tool.cache)
    if isinstance(tool, Borg):
        shutil.rmtree(tool.env()["BORG_BASE_DIR"], ignore_errors=True)
    os.makedirs(os.path.dirname(tool.store_dir), exist_ok=True)
    r = run(tool.init_cmd(), log_name=f"{tool.name}-init", logs_dir=ctx.logs, env=tool.env(),
            cwd=ctx.src_dir, timeout=600)
    if r["rc"] != 0:
        err = "init " + first_error_line(r)
        return {"full": {"error": err}, "incr": {"error": err}}
    db_bytes = ctx.meta["bytes"]
    before = tool.stored_bytes()
    for phase, version, label in (("full", ctx.v1, tool.label_full), ("incr", ctx.v2, tool.label_incr)):
        point_src(ctx, version)
        if not drop_caches():
            ctx.notes.add("could not drop the page cache (not root?): cold numbers are not cold")
        log(f"backup {tool.name} {phase}")
        c0 = tool.counter()
        r = run(tool.backup_cmd(label), log_name=f"{tool.name}-backup-{phase}", logs_dir=ctx.logs,
                env=tool.env(), cwd=ctx.src_dir, timeout=ctx.backup_timeout, capture=True)
        ok = r["rc"] == 0 or (isinstance(tool, Flr) and r["rc"] == 3)
        if not ok:
            res[phase] = {"error": first_error_line(r)}
            if phase == "full":
                res["incr"] = {"error": "full backup failed"}
                break
            continue
        after = tool.stored_bytes()
        entry = {"wall_s": r["wall"], "mb_s": db_bytes / MB / r["wall"], "cpu_s": r["cpu"],
                 "rss_mib": r["maxrss_mib"], "stored_bytes": after, "added_bytes": after - before}
        if c0 is not None:
            entry["counted"] = counter_diff(tool.counter(), c0)
        if isinstance(tool, Flr):
            try:
                entry["json"] = json.loads(r["out"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                entry["json_error"] = "no JSON on stdout"
            if r["rc"] == 3:
                entry["warning"] = "exit 3: changed while reading"
        if isinstance(tool, Flr) and os.path.isdir(os.path.join(tool.store_dir, "index")):
            entry["index_bytes"] = du_bytes(os.path.join(tool.store_dir, "index"))
        res[phase] = entry
        before = after
    if not timed:
        res["untimed"] = True
    if tool.marker_path():
        with open(tool.marker_path(), "w") as f:
            f.write(ctx.meta["sha256_v2"] + "\n")
    return res


def counter_diff(after, before):
    """Requests and bytes between two snapshots of a counting proxy."""
    kinds = {k: v - before["kinds"].get(k, 0) for k, v in after["kinds"].items()}
    return {"total": after["total"] - before["total"],
            "kinds": {k: v for k, v in kinds.items() if v},
            "bytes_up": after["bytes_up"] - before["bytes_up"],
            "bytes_down": after["bytes_down"] - before["bytes_down"],
            "status_5xx": after["status_5xx"] - before["status_5xx"]}


def native_read_backup_row(ctx):
    point_src(ctx, ctx.v1)
    drop_caches()
    r = run(["cat", ctx.v1], log_name="native-cat", logs_dir=ctx.logs, timeout=1800)
    if r["rc"] != 0:
        return {"error": first_error_line(r)}
    return {"wall_s": r["wall"], "mb_s": ctx.meta["bytes"] / MB / r["wall"], "cpu_s": r["cpu"]}


# ---------------------------------------------------------------------------
# mounts

def find_pids_for_mount(mnt, exe_name):
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in argv if a]
        if not argv:
            continue
        if os.path.basename(argv[0]) == exe_name and any(mnt in a for a in argv[1:]):
            pids.append(int(d))
    return pids


def is_mounted(mnt):
    real = os.path.realpath(mnt)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4].replace("\\040", " ") == real:
                    return True
    except OSError:
        pass
    return False


def unmount(mnt):
    for _ in range(50):
        if not is_mounted(mnt):
            return True
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if r.returncode == 0 or not is_mounted(mnt):
            return True
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)
    return not is_mounted(mnt)


def vm_hwm_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Mount:
    """One mount process of a tool, started fresh for each cold measurement."""

    def __init__(self, ctx, tool, mnt):
        self.ctx, self.tool, self.mnt = ctx, tool, mnt
        self.proc = None
        self.pid = None
        self.path = tool.mount_file(mnt)

    def start(self, timeout=180):
        os.makedirs(self.mnt, exist_ok=True)
        unmount(self.mnt)
        daemonizes = isinstance(self.tool, Flr)
        prepare = getattr(self.tool, "before_mount", None)
        if prepare:
            prepare()
        log_base = os.path.join(self.ctx.logs, f"{self.tool.name}-mount")
        env = dict(os.environ)
        env.update(self.tool.env())
        self.err_path = log_base + ".err"
        t0 = time.perf_counter()
        with open(log_base + ".out", "ab") as fo, open(self.err_path, "ab") as fe:
            self.proc = subprocess.Popen(self.tool.mount_cmd(self.mnt), stdout=fo, stderr=fe, env=env,
                                         cwd=self.ctx.src_dir, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        REG.add_pid(self.proc.pid)
        REG.add_mount(self.mnt)
        launcher_done = False
        while True:
            try:
                with open(self.path, "rb") as f:
                    if f.read(1):
                        break
            except OSError:
                pass
            rc = self.proc.poll()
            if rc is not None and not launcher_done:
                REG.drop_pid(self.proc.pid)
                if not daemonizes or rc != 0:
                    self.stop()
                    raise Failure(f"mount exited rc {rc}: {self._err_tail()}")
                launcher_done = True
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise Failure(f"mount not readable after {timeout}s: {self._err_tail()}")
            time.sleep(0.01)
        first_byte = time.perf_counter() - t0
        if daemonizes:
            pids = [p for p in find_pids_for_mount(self.mnt, os.path.basename(self.ctx.flr))
                    if p != self.proc.pid]
            if pids:
                self.pid = pids[0]
                REG.add_pid(self.pid)
            elif self.proc.poll() is None:
                self.pid = self.proc.pid  # did not fork: the launcher serves the mount
        else:
            self.pid = self.proc.pid
        return first_byte

    def _err_tail(self):
        try:
            with open(self.err_path, "rb") as f:
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return lines[-1].strip()[:120] if lines else "no message"
        except OSError:
            return "no message"

    def rss_mib(self):
        return vm_hwm_mib(self.pid) if self.pid else None

    def stop(self):
        unmount(self.mnt)
        pids = [p for p in (self.pid, self.proc.pid if self.proc else None) if p]
        deadline = time.time() + 15
        for pid in pids:
            while pid_alive(pid) and time.time() < deadline:
                if self.proc and pid == self.proc.pid and self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                    time.sleep(1)
                    if pid_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            REG.drop_pid(pid)
        if self.proc:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        REG.drop_mount(self.mnt)


class Native:
    """The file on the native filesystem: 'mounting' is a no-op."""

    name = "native"

    def __init__(self, ctx):
        self.path = ctx.v2

    def start(self):
        return None

    def rss_mib(self):
        return None

    def stop(self):
        pass


def seq_read(path, timeout):
    t0 = time.perf_counter()
    r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"],
                       capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise Failure(f"dd: {r.stderr.strip()[:100]}")
    return os.path.getsize(path) / MiB / dt


def content_matches(path, ref_sha):
    return gen_db.sha256_file(path) == ref_sha


def fio_randread(ctx, path, numjobs, tag):
    size = os.path.getsize(path)
    fname = path.replace(":", "\\:")
    out = os.path.join(ctx.logs, f"fio-{tag}-{numjobs}.json")
    cmd = ["fio", "--name=r", f"--filename={fname}", "--rw=randread", "--bs=8k",
           "--ioengine=psync", "--direct=0", "--invalidate=1", "--readonly",
           f"--runtime={ctx.fio_runtime}", f"--numjobs={numjobs}", "--group_reporting",
           "--output-format=json", f"--output={out}"]
    if numjobs > 1:
        part = (size // numjobs) // 8192 * 8192
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.fio_runtime + 300)
    if r.returncode != 0:
        raise Failure(f"fio: {(r.stderr or r.stdout).strip().splitlines()[-1][:100] if (r.stderr or r.stdout).strip() else r.returncode}")
    with open(out) as f:
        text = f.read()
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]["read"]
    pct = job.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000")
    return {"iops": job["iops"], "p99_ms": p99 / 1e6 if p99 is not None else None,
            "ios": job.get("total_ios"), "runtime_ms": job.get("runtime")}


def sqlite_probe(ctx, path, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "sqlite-probe", "--path", path,
           "--rows", str(ctx.meta["rows"]), "--mode", mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.sqlite_timeout)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise Failure(f"sqlite: {lines[-1][:100] if lines else r.returncode}")
    return json.loads(r.stdout)


def check_aggregate(ctx, res):
    res["correct"] = res["count"] == ctx.ref_aggregate["count"] and res["sum"] == ctx.ref_aggregate["sum"]
    return res


def cell_try(results, key, fn):
    try:
        results[key] = fn()
    except Failure as e:
        results[key] = {"error": str(e)}
    except subprocess.TimeoutExpired:
        results[key] = {"error": "timed out"}
    except (OSError, ValueError, KeyError) as e:
        results[key] = {"error": f"{type(e).__name__}: {e}"[:120]}


MOUNT_PARTS = ("seq", "fio1", "fio4", "lookups", "aggregate")


def measure_target(ctx, make_mount, full=True, parts=MOUNT_PARTS, counter=None):
    """All read measurements for one target; each cold one on a fresh mount
    process after dropping the page cache.  `counter`, when given, returns
    request counters; the requests of each session (mount to unmount) are
    kept under "requests"."""
    res = {"first_byte_s": [], "rss_mib": []}
    broken = []
    if not full:
        parts = [p for p in parts if p in ("seq", "fio1")]

    def session(name, fn):
        if broken:  # the mount itself failed before: do not try (and time out) again
            raise Failure(broken[0])
        drop_caches()
        c0 = counter() if counter else None
        m = make_mount()
        try:
            fb = m.start()
        except Failure as e:
            broken.append(str(e))
            raise
        if fb is not None:
            res["first_byte_s"].append(fb)
        try:
            return fn(m)
        finally:
            rss = m.rss_mib()
            if rss is not None:
                res["rss_mib"].append(rss)
            m.stop()
            if c0 is not None:
                res.setdefault("requests", {})[name] = counter_diff(counter(), c0)

    def seq(m):
        cold = seq_read(m.path, ctx.read_timeout)
        warm = seq_read(m.path, ctx.read_timeout) if full else None
        ok = content_matches(m.path, ctx.meta["sha256_v2"]) if full else None
        return {"cold": cold, "warm": warm, "content_ok": ok}

    work = {
        "seq": seq,
        "fio1": lambda m: fio_randread(ctx, m.path, 1, ctx.tag),
        "fio4": lambda m: fio_randread(ctx, m.path, 4, ctx.tag),
        "lookups": lambda m: sqlite_probe(ctx, m.path, "lookups"),
        "aggregate": lambda m: check_aggregate(ctx, sqlite_probe(ctx, m.path, "aggregate")),
    }
    for name in parts:
        cell_try(res, name, lambda: session(name, work[name]))
    if broken and not res["first_byte_s"]:
        return {"error": broken[0]}
    return res


def mount_factory(ctx, tool):
    mnt = os.path.join(ctx.mnt_root, tool.name)

    def make():
        return Mount(ctx, tool, mnt)
    return make


def repo_ready(ctx, tool):
    marker = tool.marker_path()
    if not marker:
        return False
    try:
        with open(marker) as f:
            return f.read().strip() == ctx.meta["sha256_v2"]
    except OSError:
        return False


def run_mounts(ctx, tools_by_name, results):
    out = results.setdefault("mount", {})
    targets = ["native", "flr"] + PEERS
    for name in targets:
        ctx.tag = name
        if name == "native":
            log("reads: native")
            out[name] = measure_target(ctx, lambda: Native(ctx))
            continue
        if name == "flr" and ctx.flr_error:
            out[name] = {"error": ctx.flr_error}
            continue
        tool = tools_by_name[name]
        if not repo_ready(ctx, tool):
            log(f"{name}: no repository from a backup of this dataset; backing up (untimed)")
            b = run_backups(ctx, tool, timed=False)
            if "error" in b.get("incr", {}):
                out[name] = {"error": "backup failed: " + b["incr"]["error"]}
                continue
        point_src(ctx, ctx.v2)
        if isinstance(tool, Casync):
            r = run(tool.mount_prepare_cmd(), log_name="casync-make-caidx", logs_dir=ctx.logs,
                    timeout=ctx.backup_timeout)
            if r["rc"] != 0:
                out[name] = {"error": "casync make caidx " + first_error_line(r)}
                continue
        log(f"reads: {name}")
        out[name] = measure_target(ctx, mount_factory(ctx, tool))


def run_chunker_reads(ctx, tools_by_name, results):
    out = results.setdefault("chunker_reads", {})
    for ch in CHUNKERS[1:]:
        tool = tools_by_name["flr:" + ch]
        if ctx.flr_error:
            out[ch] = {"error": ctx.flr_error}
            continue
        if not repo_ready(ctx, tool):
            log(f"{tool.name}: no repository from a backup of this dataset; backing up (untimed)")
            b = run_backups(ctx, tool, timed=False)
            if "error" in b.get("incr", {}):
                out[ch] = {"error": "backup failed: " + b["incr"]["error"]}
                continue
        ctx.tag = tool.name
        log(f"reads: {tool.name}")
        out[ch] = measure_target(ctx, mount_factory(ctx, tool), full=False)


# ---------------------------------------------------------------------------
# report

def esc(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def na(reason):
    return f"n/a ({esc(reason)})"


def fnum(x, digits=1):
    if x is None:
        return "n/a"
    if isinstance(x, float) and x >= 1000:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def cell(d, key, fmt):
    """d is a result dict that may hold 'error'; key picks a number in it."""
    if d is None:
        return na("not run")
    if "error" in d:
        return na(d["error"])
    v = d.get(key)
    if v is None:
        return na("not measured")
    return fmt(v)


def machine_info():
    info = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["fs"] = subprocess.run(["df", "-T", HERE], capture_output=True,
                                    text=True).stdout.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        pass
    return info


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def short_version(text):
    m = re.search(r"(\d+\.\d+(?:\.\d+)*)", text) or re.search(r"(\d+)", text)
    return m.group(1) if m else text


def versions(ctx):
    v = {
        "restic": short_version(cmd_version(["restic", "version"])),
        "borg": short_version(cmd_version(["borg", "--version"])),
        "casync": short_version(cmd_version(["casync", "--version"])),
        "fio": short_version(cmd_version(["fio", "--version"])),
        "zstd": short_version(cmd_version(["zstd", "--version"])),
        "SQLite (Python module)": sqlite3.sqlite_version,
        "Python": platform.python_version(),
    }
    if ctx.flr_error:
        v["flr"] = f"n/a ({ctx.flr_error})"
    else:
        v["flr"] = f"{cmd_version([ctx.flr, '--version'])} ({ctx.flr_rev})"
    return v


def row(first, cells):
    """A table row; a failure reason is written once, in its first cell, and
    later cells that failed for the same reason just say n/a."""
    seen = set()
    out = []
    for c in cells:
        if c.startswith("n/a (") and c in seen:
            c = "n/a"
        seen.add(c)
        out.append(c)
    cells = out
    return "| " + " | ".join([first] + cells) + " |"


def render(ctx, results):
    L = []
    m = ctx.meta
    db = m["bytes"]
    d = m["diff"]
    L.append(f"# flr benchmark — {results['date']}")
    L.append("")
    L.append(f"Generated by `bench/run.sh` (BENCH_SIZE_MB={ctx.size_mb}, BENCH_ONLY={ctx.only}, "
             f"fio runtime cap {ctx.fio_runtime} s). Total harness time: {results.get('total_s', 0) / 60:.1f} min.")
    L.append("")
    mi = results["machine"]
    L.append("## Machine")
    L.append("")
    L.append(f"- CPU: {mi.get('cpu', '?')}, {mi['nproc']} cores; RAM {mi.get('ram_gib', 0):.1f} GiB; "
             f"kernel {mi['kernel']}; work dir filesystem: {mi.get('fs', '?')}")
    L.append("- Tool versions: " + "; ".join(f"{k} {esc(v)}" for k, v in results["versions"].items()))
    L.append(f"- Load average (1/5/15 min) at start: {results.get('loadavg_start', '?')}, at end: "
             f"{results.get('loadavg_end', '?')} (other work on the machine skews the numbers)")
    L.append(f"- Page cache dropped before cold measurements: "
             f"{'no (see notes)' if any('drop' in n for n in ctx.notes) else 'yes'}")
    L.append("")
    L.append("## Dataset")
    L.append("")
    pl = results.get("physical")
    ratio = ""
    if pl and pl.get("db_zstd3_bytes"):
        ratio = f"; whole file compresses {db / pl['db_zstd3_bytes']:.2f}x with `zstd -3`"
    L.append(f"- SQLite database, page size {m['page_size']}, {db / MiB:,.1f} MiB ({db:,} bytes), "
             f"{m['rows']:,} rows in `rows(id INTEGER PRIMARY KEY, k INTEGER, name TEXT, payload BLOB, "
             f"amount REAL)` + index on `k`; seed {m['params']['seed']}{ratio}.")
    L.append(f"- Incremental version: {m['rows_updated']:,} rows (1%, random) got a new `amount` and a "
             f"rewritten 16-32 byte slice of `payload`, same length, in place.")
    L.append(f"- Changed: {d['pages_changed']:,} of {d['pages_total']:,} 4 KiB pages "
             f"(**{d['blocks_4k_changed_pct']}%**), {d['blocks_64k_changed_pct']}% of 64 KiB blocks, "
             f"{d['blocks_1m_changed_pct']}% of 1 MiB blocks.")
    L.append("")

    # physical limit
    L.append("## Physical limit (incremental)")
    L.append("")
    if pl:
        raw = pl["raw_bytes"]
        pp = pl.get("per_page_bytes")
        cc = pl.get("concat_bytes")
        L.append("| what | bytes | MiB | % of db |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| changed 4 KiB pages, raw | {raw:,} | {raw / MiB:,.1f} | {100 * raw / db:.1f}% |")
        if pp is not None:
            L.append(f"| (a) each page zstd -3 on its own, summed | {pp:,} | {pp / MiB:,.1f} | {100 * pp / db:.1f}% |")
        else:
            L.append(f"| (a) each page zstd -3 on its own | {na(pl.get('per_page_error'))} | | |")
        if cc is not None:
            L.append(f"| (b) changed pages concatenated, zstd -3 | {cc:,} | {cc / MiB:,.1f} | {100 * cc / db:.1f}% |")
        L.append("")
        L.append(f"(a) uses {pl.get('per_page_how', 'libzstd')}; (b) is the `zstd -3` command on the "
                 "concatenation (one frame, with checksum).")
    else:
        L.append(na(f"BENCH_ONLY={ctx.only}"))
    L.append("")

    # backup table
    L.append("## Backup: full (original db) then incremental (updated db) into one repository")
    L.append("")
    bk = results.get("backup")
    if bk:
        L.append("| tool | full MB/s | full stored MiB | incremental MB/s | incremental added MiB | "
                 "added % of db | full CPU s | peak RSS MiB (full) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        nat = bk.get("native-read")
        if nat:
            L.append(f"| native read (`cat` > /dev/null), reference | {cell(nat, 'mb_s', fnum)} | — | — | — | — | "
                     f"{cell(nat, 'cpu_s', fnum)} | — |")
        for name in ["flr"] + PEERS:
            r = bk.get(name)
            if r is None:
                continue
            f, i = r.get("full", {}), r.get("incr", {})
            L.append(row(name, [cell(f, 'mb_s', fnum), cell(f, 'stored_bytes', lambda v: fnum(v / MiB)),
                                cell(i, 'mb_s', fnum), cell(i, 'added_bytes', lambda v: fnum(v / MiB)),
                                cell(i, 'added_bytes', lambda v: fnum(100 * v / db) + '%'),
                                cell(f, 'cpu_s', fnum), cell(f, 'rss_mib', lambda v: fnum(v, 0))]))
        if pl and pl.get("concat_bytes"):
            cc = pl["concat_bytes"]
            L.append(f"| physical limit (changed pages, zstd -3) | — | — | — | {fnum(cc / MiB)} | "
                     f"{fnum(100 * cc / db)}% | — | — |")
        L.append("")
        L.append("MB/s = database bytes (10^6) / wall time; page cache dropped before every backup. "
                 "Stored = `du -sb` of the repository directory. Settings: flr defaults (`--chunker auto`); "
                 "restic defaults (repository v2, compression auto, local cache in the work dir, not counted); "
                 "borg `init -e none`, `create --compression zstd,3`, default chunker (buzhash, ~2 MiB average); "
                 "casync `make` of the file into a .caibx, defaults (~64 KiB average chunks, zstd).")
    else:
        L.append(na(f"BENCH_ONLY={ctx.only}"))
    L.append("")

    # chunker table
    L.append("## flr chunker choice")
    L.append("")
    if bk:
        cr = results.get("chunker_reads", {})
        mount_flr = results.get("mount", {}).get("flr")
        L.append("| chunker | full MB/s | full stored MiB | incremental MB/s | incremental added MiB | "
                 "added % of db | added ÷ physical limit (b) | chunks (full) | index MiB | "
                 "seq cold MiB/s | 8k rand IOPS (1 job) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        cc = pl.get("concat_bytes") if pl else None
        for ch in CHUNKERS:
            r = bk.get("flr:" + ch) if ch != "auto" else bk.get("flr")
            if r is None:
                continue
            f, i = r.get("full", {}), r.get("incr", {})
            chunks = f.get("json", {}).get("stats", {}).get("chunks") if "error" not in f else None
            rd = mount_flr if ch == "auto" else cr.get(ch)
            if rd is None:
                seq_c = rio = na("reads not run")
            elif "error" in rd:
                seq_c = rio = na(rd["error"])
            else:
                seq_c = cell(rd.get("seq"), "cold", fnum)
                rio = cell(rd.get("fio1"), "iops", lambda v: fnum(v, 0))
            if "error" in f:
                chunks_s = na(f["error"])
            else:
                chunks_s = fnum(chunks, 0) if chunks is not None else na("no chunks in --json stats")
            L.append(row(ch, [cell(f, 'mb_s', fnum), cell(f, 'stored_bytes', lambda v: fnum(v / MiB)),
                              cell(i, 'mb_s', fnum), cell(i, 'added_bytes', lambda v: fnum(v / MiB)),
                              cell(i, 'added_bytes', lambda v: fnum(100 * v / db) + '%'),
                              cell(i, 'added_bytes', lambda v: fnum(v / cc, 2) + 'x') if cc else na('no limit'),
                              chunks_s, cell(i, 'index_bytes', lambda v: fnum(v / MiB, 2)), seq_c, rio]))
        L.append("")
        L.append("Same dataset and method as the backup table. Chunks = `stats.chunks` from `flr backup --json`; "
                 "index = `du -sb REPO/index` after both backups. Reads are of the updated db's restore point, "
                 "each on a fresh mount after dropping the page cache.")
    else:
        L.append(na(f"BENCH_ONLY={ctx.only}"))
    L.append("")

    # mount table
    L.append("## Mounted reads of the updated database (the incremental's restore point)")
    L.append("")
    mt = results.get("mount")
    if mt:
        L.append("| target | seq cold MiB/s | seq warm MiB/s | 8k rand IOPS 1 job | p99 ms | "
                 "8k rand IOPS 4 jobs | p99 ms | 1200 lookups cold s | warm s | aggregate s | "
                 "mount to first byte s | peak RSS MiB | content |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for name in ["native", "flr"] + PEERS:
            r = mt.get(name)
            if r is None:
                continue
            if "error" in r:
                L.append(row(name, [na(r["error"])] * 12))
                continue
            fb = r.get("first_byte_s") or []
            rss = r.get("rss_mib") or []
            if name == "native":
                fb_s = na("no mount")
                rss_s = na("no mount process")
            else:
                fb_s = f"{statistics.median(fb):.2f}" if fb else na("no successful mount")
                rss_s = fnum(max(rss), 0) if rss else na("process not found")
            seq = r.get("seq")
            content = cell(seq, "content_ok", lambda v: "ok" if v else "**MISMATCH**")
            agg = r.get("aggregate")
            agg_s = cell(agg, "seconds", lambda v: fnum(v, 2))
            if agg and "error" not in agg and not agg.get("correct", True):
                agg_s += " (**wrong result**)"
            L.append(row(name, [cell(seq, 'cold', fnum), cell(seq, 'warm', fnum),
                                cell(r.get('fio1'), 'iops', lambda v: fnum(v, 0)),
                                cell(r.get('fio1'), 'p99_ms', lambda v: fnum(v, 2)),
                                cell(r.get('fio4'), 'iops', lambda v: fnum(v, 0)),
                                cell(r.get('fio4'), 'p99_ms', lambda v: fnum(v, 2)),
                                cell(r.get('lookups'), 'cold_s', lambda v: fnum(v, 2)),
                                cell(r.get('lookups'), 'warm_s', lambda v: fnum(v, 2)),
                                agg_s, fb_s, rss_s, content]))
        L.append("")
        L.append(
            "Method. Every cold measurement starts a fresh mount process after `sync; echo 3 > "
            "/proc/sys/vm/drop_caches` (five mounts per tool: sequential, fio 1 job, fio 4 jobs, lookups, "
            "aggregate). Sequential: `dd bs=1M` of the whole file, cold then warm (same mount, right after). "
            "Random: `fio --rw=randread --bs=8k --ioengine=psync --direct=0 --invalidate=1`, *not* time based: "
            "fio's random map reads every 8 KiB block at most once, so the page cache never serves a repeat; "
            f"a run ends when the file is read once or after {ctx.fio_runtime} s. With 4 jobs each job reads "
            "its own quarter of the file (`--size`, `--offset_increment`), `--group_reporting`; p99 is of "
            "completion latency. Lookups: 1200 random `SELECT name, amount, length(payload) FROM rows WHERE id=?` "
            "through Python's sqlite3 on `file:PATH?immutable=1`, cold then warm (a second connection, same ids). "
            "Aggregate: `SELECT count(*), sum(amount) FROM rows` on a fresh mount, result checked against the "
            "native file. Mount to first byte: from starting the mount command to the first byte read from the "
            "file (median of the five mounts). Peak RSS: VmHWM of the mount process just before unmount (max "
            "over the five). Content: sha256 of the file read through the mount equals the original's. "
            "Mounts: flr `mount --repo R MNT --background`, file at MNT/bench/latest/bench.db; restic "
            "`mount` (foreground, in the background), snapshots/latest/bench.db; borg `mount -f REPO::incr`; "
            "casync `mount` of a .caidx archive of the db's directory made into the same store (`casync mount` "
            "does not take the .caibx blob index; `casync mkdev` would need /dev/nbd).")
    else:
        L.append(na(f"BENCH_ONLY={ctx.only}"))
    L.append("")
    if ctx.notes:
        L.append("## Notes")
        L.append("")
        for n in sorted(ctx.notes):
            L.append(f"- {n}")
        L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------

class Ctx:
    pass


def stop_everything():
    """Unmounts what this driver mounted and ends the processes it started."""
    for mnt in list(REG.mounts):
        unmount(mnt)
    for pid in list(REG.pids):  # only processes this driver started
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        REG.drop_pid(pid)


def make_ctx(args):
    """The settings and paths of a run, the dataset's metadata and the
    aggregate the mounted reads are checked against; sets up REG."""
    global REG
    ctx = Ctx()
    ctx.work = os.path.abspath(args.work)
    ctx.flr = os.path.abspath(args.flr) if args.flr else None
    ctx.flr_error = args.flr_error or (None if ctx.flr and os.access(ctx.flr, os.X_OK) else "flr binary missing")
    ctx.flr_rev = args.flr_rev or "?"
    ctx.only = args.only
    ctx.size_mb = args.size_mb
    ctx.fio_runtime = args.fio_runtime
    ctx.backup_timeout = args.backup_timeout
    ctx.read_timeout = 1800
    ctx.sqlite_timeout = 1200
    ctx.notes = set(args.note or [])
    ctx.data = os.path.join(ctx.work, "data")
    ctx.v1 = os.path.join(ctx.data, "v1", "bench.db")
    ctx.v2 = os.path.join(ctx.data, "v2", "bench.db")
    ctx.src_dir = os.path.join(ctx.work, "src")
    ctx.src_file = os.path.join(ctx.src_dir, "bench.db")
    ctx.repos = os.path.join(ctx.work, "repos")
    ctx.mnt_root = os.path.join(ctx.work, "mnt")
    ctx.logs = os.path.join(ctx.work, "logs")
    ctx.tag = ""
    for d in (ctx.src_dir, ctx.repos, ctx.mnt_root, ctx.logs):
        os.makedirs(d, exist_ok=True)
    REG = Registry(os.path.join(ctx.work, "run"))
    with open(os.path.join(ctx.data, "dataset.json")) as f:
        ctx.meta = json.load(f)
    if not drop_caches():
        ctx.notes.add("could not drop the page cache (not root?): cold numbers are not cold")
    con = sqlite3.connect("file:" + urllib.parse.quote(ctx.v2) + "?immutable=1", uri=True)
    cnt, total = con.execute("SELECT count(*), sum(amount) FROM rows").fetchone()
    con.close()
    ctx.ref_aggregate = {"count": cnt, "sum": total}
    return ctx


def cmd_run(args):
    t_start = time.time()
    ctx = make_ctx(args)
    tools = {"restic": Restic(ctx), "borg": Borg(ctx), "casync": Casync(ctx), "flr": Flr(ctx, "auto")}
    for ch in CHUNKERS[1:]:
        tools["flr:" + ch] = Flr(ctx, ch)

    raw = os.path.join(ctx.work, "results-last.json")
    if args.render_only:
        with open(raw) as f:
            results = json.load(f)
        ctx.notes |= set(results.get("notes", []))
        md = render(ctx, results)
        with open(args.out, "w") as f:
            f.write(md + "\n")
        print(md)
        return

    results = {"date": args.date, "machine": machine_info(), "versions": versions(ctx),
               "loadavg_start": loadavg()}
    point_src(ctx, ctx.v1)
    try:
        if ctx.only in ("all", "backup"):
            log("physical limit")
            results["physical"] = physical_limit(ctx)
            bk = results["backup"] = {}
            bk["native-read"] = native_read_backup_row(ctx)
            for name in ["flr"] + PEERS + ["flr:" + c for c in CHUNKERS[1:]]:
                if name.startswith("flr") and ctx.flr_error:
                    bk[name] = {"full": {"error": ctx.flr_error}, "incr": {"error": ctx.flr_error}}
                    continue
                bk[name] = run_backups(ctx, tools[name])
        if ctx.only in ("all", "mount"):
            run_mounts(ctx, tools, results)
            run_chunker_reads(ctx, tools, results)
    finally:
        stop_everything()
        results["total_s"] = time.time() - t_start
        results["loadavg_end"] = loadavg()
        results["notes"] = sorted(ctx.notes)
        with open(raw, "w") as f:
            json.dump(results, f, indent=2, default=str)
    md = render(ctx, results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md + "\n")
    print(md)


def cmd_sqlite_probe(args):
    uri = "file:" + urllib.parse.quote(os.path.abspath(args.path)) + "?immutable=1"
    if args.mode == "lookups":
        ids = random.Random(4242).sample(range(1, args.rows + 1), min(LOOKUPS, args.rows))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            con = sqlite3.connect(uri, uri=True)
            n = 0
            for rid in ids:
                row = con.execute("SELECT name, amount, length(payload) FROM rows WHERE id=?",
                                  (rid,)).fetchone()
                if row is not None:
                    n += 1
            con.close()
            times.append(time.perf_counter() - t0)
            if n != len(ids):
                raise SystemExit(f"only {n} of {len(ids)} ids found")
        print(json.dumps({"cold_s": times[0], "warm_s": times[1]}))
    else:
        t0 = time.perf_counter()
        con = sqlite3.connect(uri, uri=True)
        cnt, total = con.execute("SELECT count(*), sum(amount) FROM rows").fetchone()
        con.close()
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "count": cnt, "sum": total}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--flr", help="path of the flr binary")
    r.add_argument("--flr-error", help="why flr cannot be measured (e.g. build failed)")
    r.add_argument("--flr-rev", help="source revision of flr")
    r.add_argument("--only", choices=["all", "backup", "mount"], default="all")
    r.add_argument("--size-mb", type=int, default=1024)
    r.add_argument("--fio-runtime", type=int, default=15)
    r.add_argument("--backup-timeout", type=int, default=3600)
    r.add_argument("--date", default=datetime.date.today().isoformat())
    r.add_argument("--note", action="append")
    r.add_argument("--out", required=True)
    r.add_argument("--render-only", action="store_true",
                   help="only re-render the report from WORK/results-last.json")
    p = sub.add_parser("sqlite-probe")
    p.add_argument("--path", required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--mode", choices=["lookups", "aggregate"], required=True)
    args = ap.parse_args()

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if args.cmd == "run":
        cmd_run(args)
    else:
        cmd_sqlite_probe(args)


if __name__ == "__main__":
    main()
