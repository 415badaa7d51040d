"""Torch weights stage: ImageNet-initialised U-Net encoders from a local torchvision or timm ResNet weights file.

`load_resnet` copies a torchvision ResNet-18/34/50 `state_dict`, saved as a safetensors file, onto the U-Net's
`encoder` sub-tree (timm's plain ResNets, e.g. `resnet50.a1_in1k`, use the same key names). The decoder and the
segmentation head stay at their initialisation. `read_safetensors` / `write_safetensors` are a numpy reader and
writer of the format, so neither torch nor the `safetensors` package is needed here. The weights are exported
once, on a machine with internet (the commands are in `EXPORT_COMMANDS`):

  conv1 -> stem, bn1 -> stem_norm, layer{i}.{j}.conv{k} / bn{k} -> layer{i}_{j}/Conv_{k-1} / BatchNorm_{k-1},
  layer{i}.{j}.downsample.0 / .1 -> layer{i}_{j}/proj / proj_norm; kernels OIHW -> HWIO; BatchNorm weight, bias,
  running_mean, running_var -> scale, bias, mean, var; fc.* and num_batches_tracked are ignored.

Input convention. The torchvision networks saw (x - mean) / std per RGB channel; usjax feeds [0, 1] grayscale.
  * Channels: the RGB stem is folded to the model's input channels as `checkpoint.load_pretrained` does: summed
    over RGB for 1 channel (a gray image seen as R=G=B gives the same response), its mean repeated for several.
  * The 1/std scale is folded into the stem kernel (`fold_std`, on by default): conv1 is linear and unbiased and a
    scale commutes with zero padding, so the stem on [0, 1] input equals torchvision's conv1 on x / std exactly.
    The std comes from the file's `__metadata__` ("std", a JSON list, as the timm export writes it) or is
    torchvision's ImageNet std.
  * The mean shift is not folded. It would be a constant per output channel, which `stem_norm`'s running mean
    could absorb, but only in the interior: torchvision zero-pads the normalised image (the ImageNet mean colour),
    usjax zero-pads the raw one (black), so wherever the 7x7 window overlaps the padding the two differ. So in
    eval mode the stem's running mean is off by that constant until it adapts; fine-tuning trains with batch
    statistics (which remove any constant shift) and the running averages follow within tens of steps
    (momentum 0.9).

Geometry. usjax convolutions pad SAME; torchvision pads (k - 1) // 2 on both sides. They agree at stride 1, but
the stride-2 convolutions (the 7x7 stem, the first 3x3 of layers 2-4) on even sizes get one pixel less padding
before and one more after, so their sampling grid is one input pixel off torchvision's (the 1x1 projections
are not). The weights load exactly; the encoder's features are not bit-identical to torchvision's ResNet.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging

from usjax import UsjaxError

IMAGENET_STD = (0.229, 0.224, 0.225)  # torchvision's (and timm's default) per-RGB-channel input std

# Run once on a machine with internet (torch + torchvision / timm + safetensors); the file is all usjax needs.
EXPORT_COMMANDS = {
    "torchvision": ("python -c \"import torchvision, safetensors.torch as st; "
                    "m = torchvision.models.resnet18(weights='IMAGENET1K_V1'); "
                    "st.save_file(m.state_dict(), 'resnet18_imagenet.safetensors')\""),
    "timm": ("python -c \"import json, timm, safetensors.torch as st; "
             "m = timm.create_model('resnet50.a1_in1k', pretrained=True); c = m.pretrained_cfg; "
             "st.save_file(m.state_dict(), 'resnet50_a1_in1k.safetensors', "
             "metadata={'mean': json.dumps(list(c['mean'])), 'std': json.dumps(list(c['std']))})\""),
}


class WeightsFileError(UsjaxError):
  """A weights file that cannot be read or does not fit the model: one line naming the file (and the tensor)."""


# ---------------------------------------------------------------------------------------------------- safetensors
# safetensors dtype code -> little-endian numpy dtype of the stored bytes (BF16 is read as raw 16-bit words).
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?"
}
_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"
}


def _is_index(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file; F16 and BF16 come back as float32."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise WeightsFileError(f"{path}: cannot read the weights file ({e.strerror or e})") from e
  if len(data) < 8:
    raise WeightsFileError(f"{path}: {len(data)} bytes, too short for a safetensors file")
  n = int.from_bytes(data[:8], "little")
  if n > len(data) - 8:
    raise WeightsFileError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes): "
                           f"not a safetensors file")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsFileError(f"{path}: the header is not JSON ({type(e).__name__}): not a safetensors file") from e
  if not isinstance(header, dict):
    raise WeightsFileError(f"{path}: the header is not a JSON object: not a safetensors file")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict):
    raise WeightsFileError(f"{path}: __metadata__ is not a JSON object")
  buf = memoryview(data)[8 + n:]
  tensors = {}
  for name, entry in header.items():
    try:
      code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
      begin, end = offsets
      ok = isinstance(shape, list) and all(_is_index(d) for d in shape) and _is_index(begin) and _is_index(end)
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise WeightsFileError(f"{path}: tensor {name}: malformed header entry {json.dumps(entry)[:200]}")
    if code not in _DTYPES:
      raise WeightsFileError(f"{path}: tensor {name}: unsupported dtype {code} (supported: {', '.join(_DTYPES)})")
    dtype = np.dtype(_DTYPES[code])
    if not begin <= end <= len(buf):
      raise WeightsFileError(f"{path}: tensor {name}: data offsets [{begin}, {end}] out of range "
                             f"(the data section holds {len(buf)} bytes)")
    count = math.prod(shape)
    if end - begin != count * dtype.itemsize:
      raise WeightsFileError(f"{path}: tensor {name}: data offsets span {end - begin} bytes, {code} {shape} "
                             f"needs {count * dtype.itemsize}")
    arr = np.frombuffer(buf, dtype, count, begin).reshape(shape)
    if code == "BF16":  # bfloat16 is the top half of a float32
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    else:
      arr = arr.astype(np.float32 if code == "F16" else dtype.newbyteorder("="))  # a native-order copy
    tensors[name] = arr
  return tensors, {str(k): str(v) for k, v in meta.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file as numpy arrays (F16 and BF16 converted to float32, 0-d kept 0-d).

  A file that is too short, whose header is not JSON or whose offsets fall outside the data raises
  `WeightsFileError` (a `UsjaxError`) with one line naming the file."""
  return _read(path)[0]


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays (float64/32/16, bfloat16, int64/32/16/8, uint8, bool) as a safetensors file.

  The header is padded with spaces to a multiple of 8 bytes (as the reference writer does, so the data is
  aligned); the file is written beside and renamed, so a crash never leaves a half-written file at `path`."""
  header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
  chunks, offset = [], 0
  for name, value in tensors.items():
    if name == "__metadata__":
      raise WeightsFileError(f"{path}: '__metadata__' is reserved and cannot name a tensor")
    arr = np.asarray(value)  # not ascontiguousarray: it makes 0-d arrays 1-d (tobytes is C order anyway)
    code = _CODES.get(arr.dtype.name)
    if code is None:
      raise WeightsFileError(f"{path}: tensor {name}: cannot write dtype {arr.dtype} (supported: {', '.join(_CODES)})")
    raw = arr.view(np.uint16) if code == "BF16" else arr
    raw = raw.astype(raw.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  head = json.dumps(header, separators=(",", ":")).encode("utf-8")
  head += b" " * (-len(head) % 8)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for c in chunks:
      f.write(c)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- ResNet
# Block counts of layer1..4 and whether the blocks are bottlenecks (conv3 present) -> torchvision depth.
_TORCH_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                 ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _file_depth(path: str, keys) -> int:
  """The depth of the torchvision ResNet whose state_dict has these keys (from the layer block counts)."""
  blocks: dict[int, int] = {}
  bottleneck = False
  for k in keys:
    m = re.match(r"layer(\d+)\.(\d+)\.", k)
    if m:
      i, j = int(m[1]), int(m[2])
      blocks[i] = max(blocks.get(i, 0), j + 1)
      bottleneck |= k.startswith(f"layer{i}.{j}.conv3.")
  if not blocks:
    raise WeightsFileError(f"{path}: holds no layer1..layer4 tensors: not a torchvision/timm ResNet state_dict")
  counts = tuple(blocks.get(i, 0) for i in range(1, max(4, max(blocks)) + 1))
  depth = _TORCH_DEPTHS.get((counts, bottleneck))
  if depth is None:
    kind = "bottleneck" if bottleneck else "basic"
    raise WeightsFileError(f"{path}: {kind} blocks per layer {counts} match no torchvision ResNet (18/34/50/101/152)")
  return depth


def _torch_key(path: tuple[str, ...]) -> str:
  """The torchvision state_dict key of an encoder leaf, e.g. ('layer2_0', 'proj_norm', 'mean') ->
  'layer2.0.downsample.1.running_mean'. A name this does not know is a change in models.py: say so."""
  *mods, leaf = path
  parts = []
  for m in mods:
    if m == "stem":
      parts.append("conv1")
    elif m == "stem_norm":
      parts.append("bn1")
    elif re.fullmatch(r"layer\d+_\d+", m):
      parts.append(m.replace("_", "."))
    elif re.fullmatch(r"(Conv|BatchNorm)_\d+", m):
      kind, k = m.split("_")
      parts.append(f"{'conv' if kind == 'Conv' else 'bn'}{int(k) + 1}")
    elif m in ("proj", "proj_norm"):
      parts.append("downsample.0" if m == "proj" else "downsample.1")
    else:
      raise WeightsFileError(f"usjax.torch_weights: encoder module {'/'.join(path)} has no torchvision counterpart "
                             f"(models.py changed? update torch_weights._torch_key)")
  if leaf == "kernel":
    return ".".join(parts + ["weight"])
  if leaf in _BN_LEAVES:
    return ".".join(parts + [_BN_LEAVES[leaf]])
  raise WeightsFileError(f"usjax.torch_weights: encoder leaf {'/'.join(path)} has no torchvision counterpart")


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _copy(tree):
  """A fresh nest of dicts over the same leaves (the caller's tree stays as it was)."""
  return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _input_std(path: str, meta: Mapping[str, str]) -> tuple[float, ...]:
  if "std" not in meta:
    return IMAGENET_STD
  try:
    std = tuple(float(s) for s in json.loads(meta["std"]))
  except (ValueError, TypeError) as e:
    raise WeightsFileError(f"{path}: __metadata__ std {meta['std']!r} is not a JSON list of numbers") from e
  if not std or min(std) <= 0:
    raise WeightsFileError(f"{path}: __metadata__ std {meta['std']!r} must be positive")
  return std


def load_resnet(path: str, params: dict, batch_stats: dict, encoder: str, *, fold_std: bool = True):
  """Copies torchvision/timm ImageNet ResNet weights from the safetensors file `path` into `params['encoder']`
  and `batch_stats['encoder']` of a U-Net whose `model.encoder` is `encoder` ('resnet18', 'resnet34', 'resnet50').

  Returns new (params, batch_stats) and a report {'checkpoint', 'loaded' (tensors copied), 'init' (top-level
  modules left at init), 'ignored' (file keys not needed: fc.*, num_batches_tracked), 'encoder', 'input_std'
  (folded into the stem, or None)}. The file must hold exactly the encoder's tensors with torchvision's shapes
  (a stem with other input channels is converted); a missing, extra or misshapen tensor, or another depth,
  raises `WeightsFileError` in one line naming the file and the key. See the module docstring for the input
  normalisation (`fold_std`) and the padding difference.
  """
  m = re.fullmatch(r"resnet(\d+)", encoder)
  if not m or "encoder" not in params:
    raise WeightsFileError(f"{path}: ImageNet ResNet weights need model.encoder resnet18/34/50, got {encoder!r}")
  if "stem_norm" not in batch_stats.get("encoder", {}):
    raise WeightsFileError(f"{path}: ImageNet ResNet weights need model.norm='batch' (their BatchNorm statistics "
                           f"have nowhere to go)")
  tensors, meta = _read(path)
  depth = _file_depth(path, tensors)
  if depth != int(m[1]):
    raise WeightsFileError(f"{path} holds ResNet-{depth} weights, but model.encoder is {encoder}")

  trees = {"params": _copy(params["encoder"]), "batch_stats": _copy(batch_stats["encoder"])}
  targets = {}  # torch key -> (collection, path under encoder, model leaf)
  for coll, tree in trees.items():
    for p, leaf in _leaves(tree):
      targets[_torch_key(p)] = (coll, p, leaf)
  for key, (coll, p, _) in targets.items():
    if key not in tensors:
      raise WeightsFileError(f"{path}: no tensor {key} (the {encoder} encoder needs it for {coll}/encoder/"
                             f"{'/'.join(p)})")
  unused = [k for k in tensors if k not in targets]
  ignored = sorted(k for k in unused if k.startswith("fc.") or k.endswith(".num_batches_tracked"))
  extra = sorted(set(unused) - set(ignored))
  if extra:
    raise WeightsFileError(f"{path}: unexpected tensor {extra[0]} (not part of a torchvision {encoder}; another "
                           f"ResNet variant?){f' and {len(extra) - 1} more' if len(extra) > 1 else ''}")

  std = _input_std(path, meta) if fold_std else None
  for key, (coll, p, leaf) in targets.items():
    value, shape = tensors[key], tuple(leaf.shape)
    if p[-1] == "kernel":  # the model's HWIO as torch's OIHW, for the check and the message
      want = (shape[3], shape[2], shape[0], shape[1])
      stem_ok = p[0] == "stem" and value.ndim == 4 and value.shape[:1] + value.shape[2:] == want[:1] + want[2:]
      if value.shape != want and not stem_ok:
        raise WeightsFileError(f"{path}: {key} has shape {tuple(value.shape)}, the {encoder} encoder expects "
                               f"{want} (OIHW) for params/encoder/{'/'.join(p)}")
      if p[0] == "stem":
        if std is not None:
          if len(std) != value.shape[1]:
            raise WeightsFileError(f"{path}: {key} has {value.shape[1]} input channels but the input std has "
                                   f"{len(std)} values (load with fold_std=False or store a matching std)")
          # the network saw x / std: scaling the kernel's input channels instead is exact, padding included
          value = value / np.asarray(std, np.float32)[None, :, None, None]
        if value.shape[1] != shape[2]:
          # as checkpoint.load_pretrained: a gray image seen as R=G=B gives the summed kernel's response
          value = (value.sum(1, keepdims=True)
                   if shape[2] == 1 else np.repeat(value.mean(1, keepdims=True), shape[2], 1))
      value = value.transpose(2, 3, 1, 0)
    elif value.shape != shape:
      raise WeightsFileError(f"{path}: {key} has shape {tuple(value.shape)}, the {encoder} encoder expects {shape} "
                             f"for {coll}/encoder/{'/'.join(p)}")
    node = trees[coll]
    for k in p[:-1]:
      node = node[k]
    node[p[-1]] = jnp.asarray(value, leaf.dtype)

  params = {**params, "encoder": trees["params"]}
  batch_stats = {**batch_stats, "encoder": trees["batch_stats"]}
  report = {
      "checkpoint": path, "loaded": len(targets), "init": sorted(k for k in params if k != "encoder"),
      "ignored": ignored, "encoder": encoder, "input_std": list(std) if std is not None else None
  }
  logging.info(
      "ImageNet weights from %s: %d tensors into the %s encoder (input std %s folded into the stem), "
      "%d ignored (fc, num_batches_tracked); left at init: %s", path, len(targets), encoder, report["input_std"],
      len(ignored), ", ".join(report["init"]))
  return params, batch_stats, report
