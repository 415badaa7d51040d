"""Writing to a file system that may be full: the bytes a save needs, one-line errors naming the path and the
shortfall, no temporary files left behind, and result files whose mode follows the umask.

`tempfile.mkstemp` creates its files 0600 whatever the umask, so results written through it could not be read by
the rest of a group sharing a cluster project; `atomic_write` creates its temporary file with mode 0666 and lets
the umask take its part, as an ordinary `open` would.
"""
from __future__ import annotations

import errno
import os
import secrets

import jax

from usjax import UsjaxError

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads in errors that arrive as text (TensorStore, under orbax, reports errno in its message).
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")


def tree_bytes(tree) -> int:
  """Bytes of the arrays of a pytree: what a checkpoint of it takes on disk, give or take its metadata."""
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def free_bytes(path: str) -> int | None:
  """Free bytes of the file system holding `path` (or the nearest folder above it that exists); None if unknown."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    st = os.statvfs(path)
  except (OSError, AttributeError):  # no statvfs (Windows), or a vanished folder
    return None
  return st.f_bavail * st.f_frsize


def is_no_space(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it was raised from, is a full disk or an exceeded quota."""
  while e is not None:
    if getattr(e, "errno", None) in _NO_SPACE_ERRNOS or any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def size(n: int | None) -> str:
  """Bytes for a reader: '16.4 kB', '57.0 MB', '1.2 GB'."""
  if n is None:
    return "an unknown amount"
  unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= s), ("bytes", 1))
  return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} bytes"


def no_space(what: str, path: str, need: int, free: int | None) -> str:
  """The one line for a write that does not fit: what, where, how much it needs and how much is free."""
  return (f"no space left on device for {what} in {path}: it needs about {size(need)}, {size(free)} free; free "
          f"some space there or use another --workdir")


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` atomically, mode per the umask; a failed write leaves neither half a file nor a
  temporary one, and fails in one line naming `path`."""
  d = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(d, f".tmp_{secrets.token_hex(6)}_{os.path.basename(path)}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 less the umask, as `open` gives
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if is_no_space(e):
      raise UsjaxError(no_space(os.path.basename(path), d, len(text.encode()), free_bytes(d))) from None
    raise UsjaxError(f"{path}: cannot be written ({e.strerror or e})") from None
