"""The progress line: rates and the time left, from a clock the test controls."""
import logging

import pytest

from usjax import report


@pytest.fixture
def clock(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(report.time, "perf_counter", lambda: now[0])
  return now


def test_progress_rate_and_eta_from_elapsed_steps(tmp_path, clock, caplog):
  r = report.Reporter(str(tmp_path), total_steps=100, images_per_step=8)
  r.mark(1)  # compilation done at step 1
  with caplog.at_level(logging.INFO):
    first = r.log(1, {"loss": 1.0})
    clock[0] += 10.0  # 9 steps x 8 images in 10 s = 7.2 images/s; 90 steps left = 720 images = 100 s
    second = r.log(10, {"loss": 0.5})
  assert first["images_per_sec"] == 0.0
  assert second["images_per_sec"] == pytest.approx(7.2)
  lines = [m for m in caplog.messages if m.startswith("step ")]
  assert lines[0].endswith("eta=?"), lines[0]  # nothing timed yet: unknown, not a huge number
  assert lines[1].endswith("eta=01:40"), lines[1]
  assert r.mean_rate() == pytest.approx(7.2)  # the untimed first row is left out


def test_duration_formats():
  assert report._duration(59) == "00:59"
  assert report._duration(3 * 3600 + 61) == "3:01:01"


def test_quiet_libraries_drops_orbax_task_errors_that_asyncio_logs_and_keeps_other_errors():
  # On a full disk, orbax's other write tasks fail the same way; asyncio logs each as it is collected, possibly
  # after the run's one-line error. Their failure already reached the caller as an exception.
  import logging as pylog
  from absl import logging as absl_logging
  from usjax import report
  handler = absl_logging.get_absl_handler()
  handlers = pylog.getLogger().handlers + [handler]
  before = {id(h): list(h.filters) for h in handlers}
  report.quiet_libraries()
  try:
    check_quiet(handler)
  finally:  # the filters are process-wide: leave the other tests' logging as it was
    for h in handlers:
      h.filters[:] = before[id(h)]


def check_quiet(handler):
  import logging as pylog
  asyncio_error = lambda msg: pylog.LogRecord("asyncio", pylog.ERROR, "/usr/lib/python3.11/asyncio/base_events.py",
                                              1771, msg, None, None)
  orbax_task = ("Task exception was never retrieved\nfuture: <Task finished name='Task-559' coro=<async_serialize_"
                "from_host() done, defined at /venv/site-packages/orbax/checkpoint/_src/serialization/"
                "serialization.py:126> exception=ValueError('RESOURCE_EXHAUSTED: No space left on device')>")
  other_task = "Task exception was never retrieved\nfuture: <Task finished coro=<fetch() defined at /app/mine.py:3>>"
  assert not handler.filter(asyncio_error(orbax_task))
  assert handler.filter(asyncio_error(other_task))
  assert handler.filter(pylog.LogRecord("usjax", pylog.ERROR, "/work/usjax/main.py", 1, "error: disk full", None,
                                        None))
