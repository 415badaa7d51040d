"""Data stage: TFDS builders for every source (synthetic and real) and the grain pipelines that read them."""

from usjax import UsjaxError


class DataError(UsjaxError, ValueError):
  """Bad input data: the message is one line and names the offending file or folder."""
