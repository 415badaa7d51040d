"""ImageNet ResNet weights from a torchvision/timm safetensors file into the U-Net encoder (usjax.torch_weights).

torchvision is not installed here: `torchvision_state_dict` builds a state_dict with torchvision's exact key names
and shapes (as `torchvision.models.resnet{18,34,50}().state_dict()` has them, 122 / 218 / 320 entries)."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from usjax import UsjaxError, models, torch_weights

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def torchvision_state_dict(depth, value):
  """torchvision's ResNet state_dict: `value(key, shape)` gives each float tensor (num_batches_tracked: int64 0)."""
  sd = {}

  def conv(key, o, i, k):
    sd[f"{key}.weight"] = value(f"{key}.weight", (o, i, k, k))

  def bn(key, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{key}.{leaf}"] = value(f"{key}.{leaf}", (c,))
    sd[f"{key}.num_batches_tracked"] = np.array(0, np.int64)

  expansion = 4 if depth >= 50 else 1
  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for i, (planes, n) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth]), 1):
    for j in range(n):
      stride, b = (2 if i > 1 and j == 0 else 1), f"layer{i}.{j}"
      if expansion == 1:
        conv(f"{b}.conv1", planes, inplanes, 3), bn(f"{b}.bn1", planes)
        conv(f"{b}.conv2", planes, planes, 3), bn(f"{b}.bn2", planes)
      else:
        conv(f"{b}.conv1", planes, inplanes, 1), bn(f"{b}.bn1", planes)
        conv(f"{b}.conv2", planes, planes, 3), bn(f"{b}.bn2", planes)
        conv(f"{b}.conv3", planes * 4, planes, 1), bn(f"{b}.bn3", planes * 4)
      if stride != 1 or inplanes != planes * expansion:
        conv(f"{b}.downsample.0", planes * expansion, inplanes, 1), bn(f"{b}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  sd["fc.weight"] = value("fc.weight", (1000, 512 * expansion))
  sd["fc.bias"] = value("fc.bias", (1000,))
  return sd


def random_value(seed):
  """Random tensors at realistic scales (He-normal kernels, positive variances), so a forward pass stays finite."""
  rng = np.random.default_rng(seed)

  def value(key, shape):
    if key.endswith("running_var"):
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if len(shape) == 4:
      return (rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)

  return value


def model_variables(encoder, channels):
  """A U-Net's variables as numpy arrays from shapes alone (nothing is compiled); random, so copies are visible
  (variances positive, so the decoder left at these values still runs)."""
  shapes = jax.eval_shape(lambda: models.UNet(encoder=encoder).init(jax.random.key(0), jnp.zeros(
      (2, 32, 32, channels)), train=False))
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 2.0, s.shape)
                    if p[-1].key == "var" else rng.normal(size=s.shape)).astype(np.float32), shapes)


def hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


def flax_path(key):
  """The naming contract, written out: torchvision key -> (collection, path under the encoder)."""
  leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  if key == "conv1.weight":
    return "params", ("stem", "kernel")
  if m := re.fullmatch(r"bn1\.(\w+)", key):
    return ("batch_stats" if "running" in m[1] else "params"), ("stem_norm", leaf[m[1]])
  block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key).group(1, 2), key.split(".", 2)[2]
  mod = f"layer{block[0]}_{block[1]}"
  if m := re.fullmatch(r"(conv|bn)(\d)\.(\w+)", rest):
    sub = f"{'Conv' if m[1] == 'conv' else 'BatchNorm'}_{int(m[2]) - 1}"
    name = "kernel" if m[1] == "conv" else leaf[m[3]]
  else:
    m = re.fullmatch(r"downsample\.([01])\.(\w+)", rest)
    sub, name = ("proj", "kernel") if m[1] == "0" else ("proj_norm", leaf[m[2]])
  return ("batch_stats" if name in ("mean", "var") else "params"), (mod, sub, name)


def get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  sd = torchvision_state_dict(18, random_value(0))
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
  torch_weights.write_safetensors(path, sd)
  return path, sd


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_tensors_land_where_they_belong(resnet18_file, channels):
  path, sd = resnet18_file
  fresh = model_variables("resnet18", channels)
  params, stats, report = torch_weights.load_resnet(path, fresh["params"], fresh["batch_stats"], "resnet18")
  enc, enc_stats = params["encoder"], stats["encoder"]
  # stem: the network saw x / std per RGB channel, so the kernel is scaled by 1/std, then (1 channel) summed
  std = np.asarray(torch_weights.IMAGENET_STD, np.float32)[None, :, None, None]
  folded = hwio(sd["conv1.weight"] / std)
  expect = folded.sum(2, keepdims=True) if channels == 1 else folded
  np.testing.assert_allclose(enc["stem"]["kernel"], expect, rtol=1e-6, atol=1e-7)
  # a BatchNorm in a block, and the projection shortcut's conv and BatchNorm
  for torch_bn, mod, sub in [("layer2.0.bn1", "layer2_0", "BatchNorm_0"),
                             ("layer2.0.downsample.1", "layer2_0", "proj_norm"), ("bn1", None, "stem_norm")]:
    p, s = (enc[mod][sub], enc_stats[mod][sub]) if mod else (enc[sub], enc_stats[sub])
    np.testing.assert_array_equal(p["scale"], sd[f"{torch_bn}.weight"])
    np.testing.assert_array_equal(p["bias"], sd[f"{torch_bn}.bias"])
    np.testing.assert_array_equal(s["mean"], sd[f"{torch_bn}.running_mean"])
    np.testing.assert_array_equal(s["var"], sd[f"{torch_bn}.running_var"])
  np.testing.assert_array_equal(enc["layer2_0"]["proj"]["kernel"], hwio(sd["layer2.0.downsample.0.weight"]))
  np.testing.assert_array_equal(enc["layer4_1"]["Conv_1"]["kernel"], hwio(sd["layer4.1.conv2.weight"]))
  # the rest of the U-Net is untouched, and so is the caller's tree
  np.testing.assert_array_equal(params["decoder"]["up0"]["Conv_0"]["kernel"],
                                fresh["params"]["decoder"]["up0"]["Conv_0"]["kernel"])
  np.testing.assert_array_equal(params["seg_head"]["kernel"], fresh["params"]["seg_head"]["kernel"])
  assert not np.array_equal(fresh["params"]["encoder"]["stem"]["kernel"], enc["stem"]["kernel"])
  assert report["loaded"] == 20 + 20 * 4  # 20 convolutions, 20 BatchNorms of 4 tensors each
  assert report["init"] == ["decoder", "seg_head"]
  assert "fc.weight" in report["ignored"] and "fc.bias" in report["ignored"] and len(report["ignored"]) == 2 + 20
  assert report["input_std"] == list(torch_weights.IMAGENET_STD)

  unscaled, _, report = torch_weights.load_resnet(path, fresh["params"], fresh["batch_stats"], "resnet18",
                                                  fold_std=False)
  plain = hwio(sd["conv1.weight"])
  np.testing.assert_allclose(unscaled["encoder"]["stem"]["kernel"],
                             plain.sum(2, keepdims=True) if channels == 1 else plain, rtol=1e-6, atol=1e-7)
  assert report["input_std"] is None


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_every_tensor_has_its_place(tmp_path, depth):
  """Each tensor holds its own index (F16 zeros-sized file): every encoder leaf must hold the index of the key the
  naming contract assigns to it, and every leaf is filled. resnet50 checks the bottleneck and conv3 names."""
  index = {}

  def value(key, shape):
    index[key] = len(index) + 1
    return np.full(shape, index[key], np.float16)  # exact in float16 up to 2048

  sd = torchvision_state_dict(depth, value)
  assert len(sd) == {18: 122, 34: 218, 50: 320}[depth]  # as torchvision's state_dict()
  path = str(tmp_path / "w.safetensors")
  torch_weights.write_safetensors(path, sd)
  shapes = jax.eval_shape(lambda: models.UNet(encoder=f"resnet{depth}").init(jax.random.key(0), jnp.zeros(
      (2, 32, 32, 3)), train=False))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params, stats, report = torch_weights.load_resnet(path, zeros["params"], zeros["batch_stats"], f"resnet{depth}",
                                                    fold_std=False)
  trees = {"params": params["encoder"], "batch_stats": stats["encoder"]}
  for key, i in index.items():
    if key.startswith("fc."):
      continue
    coll, p = flax_path(key)
    leaf = get(trees[coll], p)
    assert leaf.min() == leaf.max() == i, (key, coll, p)
  n_leaves = len(jax.tree.leaves(trees))
  assert report["loaded"] == n_leaves == sum(1 for k in sd if not k.startswith("fc.") and "num_batches" not in k)


def test_read_write_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "w32": rng.normal(size=(3, 4, 2)).astype(np.float32), "w16": rng.normal(size=(5,)).astype(np.float16),
      "wbf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16), "count": np.array(7, np.int64), "empty": np.zeros(
          (0, 3), np.float32)
  }
  path = str(tmp_path / "t.safetensors")
  torch_weights.write_safetensors(path, tensors, metadata={"std": "[0.5, 0.5, 0.5]"})
  raw = open(path, "rb").read()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  assert n % 8 == 0 and header["__metadata__"] == {"std": "[0.5, 0.5, 0.5]"}
  assert header["wbf16"]["dtype"] == "BF16" and header["count"] == {
      "dtype": "I64", "shape": [], "data_offsets": header["count"]["data_offsets"]
  }
  got = torch_weights.read_safetensors(path)
  assert sorted(got) == sorted(tensors)
  for k, v in tensors.items():
    want = v.astype(np.float32) if v.dtype.name in ("float16", "bfloat16") else v
    assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want)


def test_reads_a_file_written_to_the_spec(tmp_path):
  """Bytes laid out by hand from the format's description (unpadded header, tensors out of order), so the reader
  is not only checked against its own writer."""
  data = (
      np.array([1.0, -2.0], "<f4").tobytes() + np.array([0x3F80, 0xC040], "<u2").tobytes()  # bf16 1.0, -3.0
      + np.array([5], "<i8").tobytes())
  header = {
      "b": {"dtype": "BF16", "shape": [2],
            "data_offsets": [8, 12]}, "a": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]},
      "n": {"dtype": "I64", "shape": [], "data_offsets": [12, 20]}, "__metadata__": {"format": "pt"}
  }
  head = json.dumps(header).encode()
  path = tmp_path / "spec.safetensors"
  path.write_bytes(len(head).to_bytes(8, "little") + head + data)
  got = torch_weights.read_safetensors(str(path))
  np.testing.assert_array_equal(got["a"], [[1.0], [-2.0]])
  np.testing.assert_array_equal(got["b"], np.array([1.0, -3.0], np.float32))
  assert got["n"].shape == () and got["n"] == 5 and got["n"].dtype == np.int64


def one_line_error(fn, *args, **kw) -> str:
  with pytest.raises(UsjaxError) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_bad_files_fail_in_one_line_naming_the_file(tmp_path):
  head = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
  cases = {
      "short": b"\x01\x02\x03",
      "past_end": (10**6).to_bytes(8, "little") + b"{}",
      "not_json": (4).to_bytes(8, "little") + b"nope",
      "offsets": len(head).to_bytes(8, "little") + head + b"\0" * 8,  # 16 bytes claimed, 8 present
      "dtype": (lambda h: len(h).to_bytes(8, "little") + h + b"\0" * 4
               )(json.dumps({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode())
  }
  for name, raw in cases.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(raw)
    assert str(path) in one_line_error(torch_weights.read_safetensors, str(path)), name
  assert "missing.safetensors" in one_line_error(torch_weights.read_safetensors, str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("change,key", [
    ("missing", "layer3.1.bn2.running_var"),
    ("extra", "layer1.0.se.fc1.weight"),
    ("misshapen", "layer2.0.conv1.weight"),
    ("misshapen", "layer4.0.downsample.1.bias"),
])
def test_missing_extra_or_misshapen_tensor_is_named(tmp_path, resnet18_file, change, key):
  sd = dict(resnet18_file[1])
  if change == "missing":
    del sd[key]
  elif change == "extra":
    sd[key] = np.zeros((4, 64, 1, 1), np.float32)
  else:
    sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,), np.float32)
  path = str(tmp_path / "bad.safetensors")
  torch_weights.write_safetensors(path, sd)
  fresh = model_variables("resnet18", 1)
  msg = one_line_error(torch_weights.load_resnet, path, fresh["params"], fresh["batch_stats"], "resnet18")
  assert key in msg and path in msg, msg


@pytest.mark.parametrize("depth", [34, 50])
def test_depth_mismatch_names_both(tmp_path, depth):
  # the depth is read from the key names alone, so tiny tensors do
  sd = torchvision_state_dict(depth, lambda key, shape: np.zeros((1,), np.float32))
  path = str(tmp_path / f"resnet{depth}.safetensors")
  torch_weights.write_safetensors(path, sd)
  fresh = model_variables("resnet18", 1)
  msg = one_line_error(torch_weights.load_resnet, path, fresh["params"], fresh["batch_stats"], "resnet18")
  assert f"ResNet-{depth}" in msg and "resnet18" in msg and path in msg, msg


def test_loaded_unet_runs_and_its_stem_matches_a_reference(resnet18_file):
  """Eval-mode forward pass of the loaded U-Net; its first encoder feature (stem conv + BN + ReLU) against the
  same computation done on torchvision's tensors: x / std per RGB channel, OIHW kernel, running statistics.
  The padding is the model's SAME (torchvision's own stem pads 3 | 3 where SAME pads 2 | 3 on even sizes)."""
  path, sd = resnet18_file
  fresh = model_variables("resnet18", 1)
  params, stats, _ = torch_weights.load_resnet(path, fresh["params"], fresh["batch_stats"], "resnet18")
  x = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 1)).astype(np.float32)
  model = models.UNet(encoder="resnet18")

  @jax.jit
  def forward(params, stats, x):
    return model.apply({"params": params, "batch_stats": stats}, x, train=False,
                       capture_intermediates=lambda mdl, _: mdl.name == "stem_norm")

  logits, inter = forward(params, stats, x)
  assert logits.shape == (2, 32, 32, 1) and np.isfinite(np.asarray(logits)).all()
  stem = np.maximum(np.asarray(inter["intermediates"]["encoder"]["stem_norm"]["__call__"][0]), 0)

  rgb = np.repeat(x.transpose(0, 3, 1, 2), 3, 1) / np.asarray(torch_weights.IMAGENET_STD)[None, :, None, None]
  y = jax.lax.conv_general_dilated(rgb.astype(np.float32), sd["conv1.weight"], (2, 2), "SAME",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
  y = np.asarray(y).astype(np.float64)
  c = lambda v: v[None, :, None, None]  # noqa: E731
  y = (y - c(sd["bn1.running_mean"])) / np.sqrt(c(sd["bn1.running_var"]) + 1e-5) * c(sd["bn1.weight"]) \
      + c(sd["bn1.bias"])
  ref = np.maximum(y, 0).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(stem, ref, rtol=1e-4, atol=1e-4)


def test_input_std_from_the_file_metadata(tmp_path, resnet18_file):
  """A timm export stores its pretrained_cfg std in __metadata__: that std, not ImageNet's, is folded."""
  sd = resnet18_file[1]
  fresh = model_variables("resnet18", 1)
  path = str(tmp_path / "timm.safetensors")
  torch_weights.write_safetensors(path, sd, metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.25, 1.0]"})
  params, _, report = torch_weights.load_resnet(path, fresh["params"], fresh["batch_stats"], "resnet18")
  std = np.asarray([0.5, 0.25, 1.0], np.float32)[None, :, None, None]
  expect = hwio(sd["conv1.weight"] / std).sum(2, keepdims=True)
  np.testing.assert_allclose(params["encoder"]["stem"]["kernel"], expect, rtol=1e-6, atol=1e-7)
  assert report["input_std"] == [0.5, 0.25, 1.0]
  torch_weights.write_safetensors(path, sd, metadata={"std": "0.5 0.5"})
  assert "std" in one_line_error(torch_weights.load_resnet, path, fresh["params"], fresh["batch_stats"], "resnet18")


def test_a_model_without_a_batchnorm_resnet_encoder_is_refused(resnet18_file):
  path = resnet18_file[0]
  for encoder, norm in [("resnet18", "group"), ("plain", "batch")]:
    shapes = jax.eval_shape(
        lambda: models.UNet(encoder=encoder, norm=norm).init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)), train=False))
    msg = one_line_error(torch_weights.load_resnet, path, shapes["params"], shapes.get("batch_stats", {}), encoder)
    assert path in msg and ("model.norm" in msg if norm == "group" else "model.encoder" in msg), msg
