"""One run per workdir (`runtime.lock_workdir`) and error lines that progress bars cannot garble."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from usjax import UsjaxError, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sleeper():
  """A live process that is not this one."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield proc
  proc.kill()
  proc.wait()


def exited_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def write_lock(workdir, **record) -> str:
  path = os.path.join(workdir, ".lock")
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "since": time.time(), **record}, f)
  return path


def test_lock_of_a_live_process_is_refused_in_one_line(tmp_path, sleeper):
  write_lock(tmp_path, pid=sleeper.pid, start=runtime._start_ticks(sleeper.pid))
  with pytest.raises(UsjaxError) as e:
    runtime.lock_workdir(str(tmp_path), main=True)
  msg = str(e.value)
  assert "\n" not in msg and f"pid {sleeper.pid}" in msg and socket.gethostname() in msg and str(tmp_path) in msg
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # left alone


def test_lock_of_an_exited_process_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = exited_pid()
  write_lock(tmp_path, pid=pid, start=None)
  with caplog.at_level(logging.WARNING):
    lock = runtime.lock_workdir(str(tmp_path), main=True)
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert any(f"pid {pid}" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)
  lock()
  assert not (tmp_path / ".lock").exists()


def test_lock_of_a_killed_but_unreaped_process_is_stale(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  start = runtime._start_ticks(proc.pid)
  proc.kill()
  try:
    deadline = time.time() + 10
    while (runtime._proc_stat(proc.pid) or ["Z"])[0] != "Z" and time.time() < deadline:
      time.sleep(0.05)  # a zombie until we reap it
    write_lock(tmp_path, pid=proc.pid, start=start)
    lock = runtime.lock_workdir(str(tmp_path), main=True)  # taken over, not refused
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()
  finally:
    proc.wait()


def test_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path, sleeper):
  # Containers restart their main process under the same small pid: the start time tells the two apart.
  start = runtime._start_ticks(sleeper.pid)
  if start is None:
    pytest.skip("no /proc start times here")
  write_lock(tmp_path, pid=sleeper.pid, start=start - 1)
  with runtime.lock_workdir(str(tmp_path), main=True):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / ".lock").exists()


def test_lock_of_another_host_is_held_and_says_how_to_remove_it(tmp_path):
  path = write_lock(tmp_path, pid=1, start=None, host="elsewhere.example")
  with pytest.raises(UsjaxError) as e:
    runtime.lock_workdir(str(tmp_path), main=True)
  assert "\n" not in str(e.value) and "elsewhere.example" in str(e.value) and f"delete {path}" in str(e.value)


def test_lock_is_exclusive_in_a_process_and_released_once(tmp_path):
  lock = runtime.lock_workdir(str(tmp_path / "run"), main=True)  # creates the workdir
  record = json.loads((tmp_path / "run" / ".lock").read_text())
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  with pytest.raises(UsjaxError, match="already runs in it"):
    runtime.lock_workdir(str(tmp_path / "run"), main=True)
  lock()
  lock()  # idempotent
  assert not (tmp_path / "run" / ".lock").exists()
  runtime.lock_workdir(str(tmp_path / "run"), main=True).release()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, sleeper):
  lock = runtime.lock_workdir(str(tmp_path), main=True)
  write_lock(tmp_path, pid=sleeper.pid, start=runtime._start_ticks(sleeper.pid))  # someone forced it meanwhile
  lock()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid


def test_only_process_zero_locks(tmp_path):
  runtime.lock_workdir(str(tmp_path), main=False)
  assert not (tmp_path / ".lock").exists()


def test_second_run_in_a_workdir_is_refused_while_the_first_runs(tmp_path):
  script = ("import sys, time; from usjax import runtime; runtime.lock_workdir(sys.argv[1], main=True); "
            "print('locked', flush=True); time.sleep(120)")
  first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": ROOT})
  try:
    assert first.stdout.readline().strip() == "locked"
    with pytest.raises(UsjaxError, match=f"pid {first.pid}"):
      runtime.lock_workdir(str(tmp_path), main=True)
  finally:
    first.kill()
    first.wait()
  # Killed without releasing (as by SIGKILL or a crash): the next run takes the lock over.
  runtime.lock_workdir(str(tmp_path), main=True).release()


def test_error_line_starts_on_its_own_line_after_a_progress_bar():
  out = io.StringIO()
  out.write(" 40%|####      | 4/10 [00:01<00:02]\r\x1b[A")  # a tqdm bar, cut off by the error
  runtime.print_error(UsjaxError("data/x.png: not a readable \x1b[1mPNG\x1b[0m\r image\nsecond line"), file=out)
  lines = out.getvalue().split("\n")
  assert lines[-2] == "error: data/x.png: not a readable PNG image second line" and lines[-1] == ""
  assert runtime.error_line(UsjaxError()) == "error: UsjaxError"


def test_predict_cli_error_is_one_fresh_line_and_leaves_no_output(tmp_path):
  (tmp_path / "in").mkdir()
  out = subprocess.run([
      sys.executable, "launch/predict.py", f"--workdir={tmp_path / 'nowhere'}", f"--input={tmp_path / 'in'}",
      f"--output={tmp_path / 'out'}"
  ], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  last = out.stderr.rstrip("\n").split("\n")
  assert last[-1].startswith("error: ") and "nowhere" in last[-1] and last[-2] == ""
  assert not (tmp_path / "out").exists()
