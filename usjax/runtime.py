"""Process set-up at the edges: the host allocator, the disk cache of compiled programs, joining a multi-process
run (call these before any JAX work), one run per workdir (`lock_workdir`), and one-line error output."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import socket
import sys
import time

import jax
import numpy as np
from absl import logging

from usjax import UsjaxError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_done = False


def keep_host_memory() -> bool:
  """Keeps freed host memory in the process instead of returning it to the OS. Returns whether it applied.

  XLA:CPU allocates each step's temporaries, many of them large, from worker threads; glibc serves large
  allocations with a fresh mmap and unmaps them on free, so every step page-faults its whole working set back in
  (figures: docs/performance.md). One arena, no mmap and no trimming let the heap be reused across steps.
  Must run before JAX creates its CPU client: arenas of threads that already exist are not affected.
  No-op off glibc (macOS) and when USJAX_SYSTEM_MALLOC=1.
  """
  global _done
  if _done:
    return True
  if not sys.platform.startswith("linux") or os.environ.get("USJAX_SYSTEM_MALLOC") == "1":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other C libraries have no mallopt
    return False
  ok = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _done = ok
  return ok


def compilation_cache(setting: str = "auto") -> str | None:
  """Keeps compiled programs on disk, so that a run compiles only what no earlier run on this machine compiled.
  Call before JAX's first compilation. -> the folder, or None when off.

  A grid's cells and a study's seeds and folds run the same step, scoring and probe programs again and again
  (about a minute of compiling a 64-px fine-tune on 2 CPU cores); JAX's disk cache keys each program by its HLO,
  compile options and versions, so a program seen before is loaded instead. 'auto': JAX_COMPILATION_CACHE_DIR where
  set, else $XDG_CACHE_HOME/usjax/jax (~/.cache/usjax/jax); 'none': off; anything else: that folder. Programs
  compiled in under a second are not kept (JAX's default). An unwritable folder costs the speed only: JAX then
  compiles as without it.
  """
  if setting == "none":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting == "auto":
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "usjax", "jax")
  else:
    path = setting
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when the environment describes one (Slurm, Cloud TPU, or explicit variables)."""
  if jax.distributed.is_initialized():
    return
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  cluster = "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
  if explicit:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  elif cluster or "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------------- ownership
def _proc_stat(pid: int) -> list[str] | None:
  """Fields 3 on (state, ppid, ...) of /proc/<pid>/stat; None where there is no /proc (macOS) or no such pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat[stat.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and parentheses
  return fields if len(fields) > 19 else None


def _start_ticks(pid: int) -> int | None:
  """The start time of process `pid` in clock ticks since boot (Linux /proc); None where unknown.

  Recorded beside the pid so that a pid reused by an unrelated process (containers restart their main process
  under the same small pid) is not mistaken for the original owner.
  """
  fields = _proc_stat(pid)
  try:
    return int(fields[19]) if fields else None
  except ValueError:
    return None


def owner() -> dict:
  """This process as an owner record for lock and staging files: pid, host and start time."""
  pid = os.getpid()
  return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid), "since": time.time()}


def owner_alive(info: dict) -> bool | None:
  """Whether the process of an owner record still runs: None when it ran on another host (cannot be known)."""
  if info.get("host") != socket.gethostname():
    return None
  try:
    pid = int(info["pid"])
  except (KeyError, TypeError, ValueError):
    return False
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    pass
  fields = _proc_stat(pid)
  if fields is None:  # no /proc: the pid's existence is all there is to go on
    return True
  if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
    return False
  start = info.get("start")
  return start is None or _start_ticks(pid) == start


def describe_owner(info: dict) -> str:
  since = info.get("since")
  when = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


LOCK_NAME = ".lock"
_held: set[str] = set()  # lock files this process holds: a record of our own pid in any other is stale


class WorkdirLock:
  """A held `<workdir>/.lock`. Call it (or `release()`, or leave its `with` block) to release; idempotent."""
  def __init__(self, path: str | None, record: dict | None):
    self.path, self.record = path, record

  def release(self) -> None:
    path, self.path = self.path, None
    if path is None:
      return
    _held.discard(path)
    try:  # remove only our own record: after a forced take-over the file may be someone else's
      if _read_lock(path) == self.record:
        os.remove(path)
    except OSError:
      pass

  __call__ = release

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_lock(path: str) -> dict | None:
  """The owner record of a lock file, None when it is empty or not JSON (being written, or damaged)."""
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def lock_workdir(workdir: str, *, main: bool | None = None) -> WorkdirLock:
  """Claims `workdir` for this run: one run per workdir, so two runs never rotate each other's checkpoints.

  Creates `<workdir>/.lock` atomically (O_CREAT | O_EXCL) holding this process's pid, host and start time.
  A lock of a live process, or of one on another host (whose liveness cannot be checked from here), fails in
  one line naming the owner. A lock left by a process of this host that no longer runs is taken over with a
  warning. Only process 0 of a multi-process run locks (`main`, default `jax.process_index() == 0`); the
  others get a no-op lock. Returns the lock: call it, or use it as a context manager, to release it.
  """
  if main is None:
    main = jax.process_index() == 0
  if not main:
    return WorkdirLock(None, None)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  record = owner()
  for _ in range(3):  # a take-over can race another process's: re-examine what is there then
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      pass
    else:
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
      _held.add(path)
      return WorkdirLock(path, record)
    info = _read_lock(path)
    remove = f"if no run uses it, delete {path}"
    if info is None:
      try:
        age = time.time() - os.path.getmtime(path)
      except OSError:
        continue  # released meanwhile: try again
      if age < 10:  # another process created it a moment ago and is still writing its record
        raise UsjaxError(f"--workdir {workdir}: another run is starting in it ({path} was just created)")
      logging.warning("workdir lock %s is unreadable (a run killed while creating it): taking it over", path)
    else:
      alive = owner_alive(info)
      if info.get("pid") == os.getpid() and info.get("host") == record["host"]:
        if path in _held:
          raise UsjaxError(f"--workdir {workdir}: this process already runs in it (lock {path})")
        alive = False  # our own pid, but not our lock: an earlier process that had the same pid
      if alive is None:
        raise UsjaxError(f"--workdir {workdir}: locked by a run on another host ({describe_owner(info)}); "
                         f"it cannot be checked from here: {remove}")
      if alive:
        raise UsjaxError(f"--workdir {workdir}: in use by another run ({describe_owner(info)}); wait for it to "
                         f"end or use another --workdir ({remove})")
      logging.warning("workdir lock %s of %s, which no longer runs: taking it over", path, describe_owner(info))
    try:
      if _read_lock(path) == info:  # not replaced since we judged it stale
        os.remove(path)
    except FileNotFoundError:
      pass
  raise UsjaxError(f"--workdir {workdir}: could not take the lock {path} (other runs keep claiming it)")


# ---------------------------------------------------------------------------------------------------- errors
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def error_line(e: BaseException | str) -> str:
  """'error: <message>' on one line: terminal control sequences dropped, line breaks and runs of spaces folded."""
  text = _CONTROL.sub(" ", str(e))
  return "error: " + (" ".join(text.split()) or type(e).__name__)


def print_error(e: BaseException | str, file=None) -> None:
  """Prints `error_line(e)` on a line of its own, after whatever a progress bar left on the current line.

  A progress bar (tqdm) redraws its line with '\\r' and moves the cursor with escape codes and does not end the
  line until it closes, so an error printed straight after it is glued to the bar. Starting with a newline always
  gives the error its own line, in a terminal and in a redirected log alike.
  """
  file = sys.stderr if file is None else file
  sys.stdout.flush()
  file.write("\n" + error_line(e) + "\n")
  file.flush()


def check_workdir(workdir: str) -> bool:
  """Fails early, in one line, on a workdir that cannot be written. Returns whether it already existed."""
  path = os.path.abspath(os.path.expanduser(workdir))
  existed = os.path.isdir(path)
  if os.path.exists(path) and not existed:
    raise UsjaxError(f"--workdir {workdir}: exists and is not a directory")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise UsjaxError(f"--workdir {workdir}: {parent} is not writable")
  return existed


class Preempted(UsjaxError):
  """SIGTERM (what Slurm and Cloud TPU send before preemption) or Ctrl-C: a checkpoint was saved at a step
  boundary; running the same command again resumes there."""
  exit_code = 143


class Interrupts:
  """Turns SIGTERM and SIGINT into a request that the loop honours at the next step boundary (a second Ctrl-C
  interrupts at once). Handlers can only be installed from the main thread; elsewhere this does nothing."""
  def __init__(self):
    self.signal, self._old = None, {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    import signal
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def requested(self) -> bool:
    """Whether any process was asked to stop: all processes must stop at the same step to save together."""
    if jax.process_count() == 1:
      return self.signal is not None
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(self.signal is not None))))

  def __exit__(self, *exc):
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False
