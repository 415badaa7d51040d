"""Reading and validating the image files every builder ingests.

Builders call `check_image` on every file before writing anything (a header read:
cheap, catches wrong modes and sizes), then `image_png` / `read_mask` while
generating (a full decode: catches truncation). Every failure is a one-line
`DataError` naming the file, so a bad download is fixed from the message alone.
"""

import io
import os

import numpy as np
from PIL import Image

from usjax.data import DataError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')

# Modes that hold 8-bit samples; anything else is refused rather than guessed at.
_EIGHT_BIT_MODES = frozenset({'1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB'})
_WIDE_MODES = frozenset({'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I;16S', 'I;32', 'F'})
# Pillow reports these (and subclasses) for unreadable, corrupt or truncated files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith('.')


def _open(path, data: bytes | None = None) -> Image.Image:
  path = os.fspath(path)
  if data is None and not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  try:
    img = Image.open(path if data is None else io.BytesIO(data))
  except _DECODE_ERRORS as e:
    raise DataError(f'{path}: not a readable PNG/JPEG image ({reason(e, path)})') from None
  if img.mode in _WIDE_MODES:
    bits = '32-bit' if img.mode in ('F', 'I;32') else '16-bit'
    img.close()
    raise DataError(f'{path}: {bits} images are unsupported (mode {img.mode}); convert to 8-bit first')
  if img.mode not in _EIGHT_BIT_MODES:
    img.close()
    raise DataError(f'{path}: unsupported image mode {img.mode!r}')
  return img


def reason(e: BaseException, path) -> str:
  """The library's message on one line, without the path the caller already names."""
  text = str(e)
  for p in {os.fspath(path), os.path.abspath(path)}:
    for quoted in (f"'{p}'", f'"{p}"', p):
      text = text.replace(quoted, '')
  return ' '.join(text.split()).strip(' :') or type(e).__name__


def _load(path, data: bytes | None = None) -> Image.Image:
  """Opens and fully decodes `path`; a lazy open would miss truncated data."""
  img = _open(path, data)
  try:
    img.load()
  except _DECODE_ERRORS as e:
    img.close()
    raise DataError(f'{os.fspath(path)}: corrupt or truncated image ({reason(e, path)})') from None
  return img


def check_image(path) -> tuple[int, int]:
  """Header-only validation; returns (height, width)."""
  with _open(path) as img:
    return img.height, img.width


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
  if img.mode == mode:
    return img
  if img.mode not in ('1', 'L', 'P', 'RGB'):  # Alpha is dropped (not blended); CMYK, Lab... go via RGB.
    img = img.convert('RGB')
  return img.convert(mode)


def read_image(path, channels: int) -> np.ndarray:
  """Returns a [H, W, channels] uint8 array; colour is reduced to luma for channels=1."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  with _load(path) as img:
    arr = np.asarray(_to_mode(img, 'L' if channels == 1 else 'RGB'), dtype=np.uint8)
  return arr[..., None] if channels == 1 else arr


def image_png(path, channels: int) -> bytes:
  """PNG bytes of the image as `read_image` sees it, without re-encoding when possible.

  A PNG already in the target mode is stored as is (after a full decode to
  validate it): re-encoding costs more than the whole rest of a build.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  with open(path, 'rb') as f:
    data = f.read()
  mode = 'L' if channels == 1 else 'RGB'
  with _load(path, data) as img:
    if img.format == 'PNG' and img.mode == mode:
      return data
    return encode_png(np.asarray(_to_mode(img, mode), dtype=np.uint8))


def read_mask(path) -> np.ndarray:
  """Returns a [H, W] bool foreground mask.

  1-bit masks count any set pixel; 8-bit and colour masks are thresholded at 127
  (so anti-aliased edges do not grow the lesion), except masks whose maximum is
  1, i.e. label maps saved as 0/1, which count any non-zero value.
  """
  with _load(path) as img:
    if img.mode == '1':
      return np.asarray(img, dtype=bool).copy()
    arr = np.asarray(_to_mode(img, 'L'), dtype=np.uint8)
  return arr > (0 if arr.max(initial=0) <= 1 else 127)


def encode_png(arr: np.ndarray) -> bytes:
  """PNG bytes for a [H, W], [H, W, 1] or [H, W, 3] uint8 array.

  `tfds.features.Image` needs TensorFlow to encode arrays, but stores bytes as given.
  """
  arr = np.asarray(arr)
  if arr.dtype == bool:
    arr = arr.astype(np.uint8) * 255
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()
