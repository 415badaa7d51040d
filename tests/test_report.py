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
