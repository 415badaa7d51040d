"""Orbax failures in one line: a short form of their messages, and none of the aftermath Python would print.

When one array of a checkpoint cannot be read or written (a damaged file, a full disk), orbax abandons the
others: their coroutines are finalised later, some at interpreter exit, and transfers still in flight call back
into an event loop orbax has closed meanwhile; Python prints each such error (a 60-line TensorStore spec apiece)
to stderr. The caller's one-line message says all there is to say.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys


def first_line(e: BaseException, limit: int = 200) -> str:
  """An exception as one short line: orbax and TensorStore messages run to dozens of lines of specs."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0].split(" See full TensorStore details")[0] if lines else ""
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _aftermath(u) -> bool:
  """Whether an unraisable error is the aftermath of a failed orbax read or write."""
  code = getattr(u.object, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True
  if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
    tb = u.exc_traceback
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return True
      tb = tb.tb_next
  return False


_hook = None  # ours, while it is the installed one


def install_filter() -> None:
  """Drops orbax's aftermath (above) from the unraisable-error reports, for good: a write fails in a background
  thread, and its aftermath may come at any time, up to interpreter exit. Every other unraisable error still
  reaches the previous hook. Installed again if something (a test runner) replaced it meanwhile."""
  global _hook
  if _hook is not None and sys.unraisablehook is _hook:
    return
  previous = sys.unraisablehook

  def hook(u, _previous=previous, _aftermath=_aftermath):  # bound now: module globals are gone at exit
    try:
      quiet = _aftermath(u)
    except Exception:  # noqa: BLE001 (half torn down at exit: report as before)
      quiet = False
    if not quiet:
      _previous(u)

  sys.unraisablehook = _hook = hook


@contextlib.contextmanager
def quiet_failures():
  """Around orbax reads and writes: the filter installed, and after a failure the abandoned coroutines finalised
  at once, under it."""
  install_filter()
  try:
    yield
  except BaseException:
    gc.collect()
    raise
