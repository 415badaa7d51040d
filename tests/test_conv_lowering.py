"""`usjax.cpu_ops` lowers the models' convolutions and max-pool as im2col + matmul, Winograd and elementwise passes
on CPU (`config.model.conv_impl`): each must be the same function as XLA's, and a model built with them
(`models.layers('cpu')`) the same network as the plain Flax one (`models.layers('xla')`)."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from usjax import conv_matmul, cpu_ops, models, winograd


def lax_conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (spatial size, kernel, stride, in, out): tiny maps, odd sizes, strided, 1x1 projections, the 7x7 stem
SHAPES = [(2, 3, 1, 8, 4), (4, 3, 2, 8, 4), (5, 3, 2, 3, 4), (7, 1, 2, 6, 4), (9, 7, 2, 1, 4), (1, 3, 1, 4, 4)]


def assert_same_conv(conv, x, w, stride, tol_value=(1e-5, 1e-5), tol_grad=(1e-5, 1e-4)):
  """`conv` has the value and both gradients (for a random cotangent) of XLA's SAME convolution."""
  y_ref, vjp_ref = jax.vjp(lambda x, w: lax_conv(x, w, stride), x, w)
  y, vjp = jax.vjp(lambda x, w: conv(x, w, stride), x, w)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, *tol_value)
  g = jax.random.normal(jax.random.key(9), y.shape)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, *tol_grad)


@pytest.mark.parametrize("hw,k,stride,cin,cout", SHAPES)
def test_conv_as_matmul_matches_lax_forward_and_gradients(hw, k, stride, cin, cout):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, hw, hw + 1, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  assert_same_conv(cpu_ops.conv_as_matmul, x, w, stride)


@pytest.mark.parametrize("hw,stride", [(2, 1), (4, 2), (8, 1), (8, 2)])
def test_conv_module_matches_flax_conv(hw, stride):
  """The CPU layers' conv has the parameters and output of `nn.Conv` with SAME padding, whichever lowering the
  shape gets."""
  x = jax.random.normal(jax.random.key(1), (2, hw, hw, 8))
  conv = models.layers("cpu")["conv"](16, (3, 3), stride)
  variables = conv.init(jax.random.key(2), x)
  ref = nn.Conv(16, (3, 3), stride, padding="SAME")
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(jax.random.key(2), x))
  np.testing.assert_allclose(conv.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)


# (x shape, kernel shape, stride) reaching every (fwd, dx, dw) path of `cpu_conv_paths`
PATH_CASES = [
    ((2, 16, 18, 1), (7, 7, 1, 8), 2),  # stem: lax forward, matmul weight gradient
    ((2, 9, 9, 8), (3, 3, 8, 4), 1),  # mid-sized map: lax forward, per-tap weight gradient
    ((1, 65, 66, 5), (3, 3, 5, 2), 1),  # large map (> 64x64): lax everywhere
    ((2, 9, 8, 8), (3, 3, 8, 16), 2),  # strided 3x3: matmul everywhere
    ((2, 12, 12, 8), (1, 1, 8, 16), 2),  # strided 1x1 projection: per-tap weight gradient
    ((2, 3, 3, 16), (3, 3, 16, 8), 1),  # tiny map: matmul everywhere
    ((1, 16, 18, 64), (3, 3, 64, 64), 1),  # 3x3 stride 1, >= 64 channels: Winograd in all three passes
    ((16, 4, 4, 64), (3, 3, 64, 64), 1),  # a 4x4 map whose Winograd matmuls have 64 rows: Winograd too
]


def test_path_cases_cover_every_lowering():
  paths = {cpu_ops.cpu_conv_paths(x, k, s) for x, k, s in PATH_CASES}
  assert {p[0] for p in paths} == {p[1] for p in paths} == {"lax", "matmul", "winograd"}
  assert {p[2] for p in paths} == {"lax", "matmul", "taps", "winograd"}
  assert cpu_ops.cpu_conv_paths(*PATH_CASES[-1]) == ("winograd",) * 3  # the 4x4 map is checked below
  # Winograd once its 16 matmuls have >= 64 rows (tiles): on 2x2 maps (a tile per image) 32 images lost to
  # im2col, 256 won 1.65x (`--what=conv`-style timing of the three passes)
  assert cpu_ops.cpu_conv_paths((32, 2, 2, 512), (3, 3, 512, 512), 1) == ("matmul", "matmul", "matmul")
  assert cpu_ops.cpu_conv_paths((256, 2, 2, 512), (3, 3, 512, 512), 1) == ("winograd",) * 3


@pytest.mark.parametrize("x_shape,k_shape,stride", PATH_CASES)
def test_cpu_conv_value_and_gradients_match_lax(x_shape, k_shape, stride):
  """The custom-VJP convolution is the same function as XLA's, whichever lowering each pass takes."""
  kx, kw = jax.random.split(jax.random.key(3))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, k_shape)
  assert_same_conv(cpu_ops.cpu_conv, x, w, stride, tol_value=(1e-5, 1e-4), tol_grad=(1e-4, 1e-3))


@pytest.mark.parametrize("hw,k,stride,c", [(6, 3, 1, 6), (7, 3, 2, 6), (5, 1, 2, 6), (9, 7, 2, 1), (6, 3, 1, 3)])
def test_weight_grad_by_taps_matches_numpy_correlation(hw, k, stride, c):
  """dW[i, j, c, d] = sum over n, output pixels p of xpad[n, s*p + (i, j), c] * dy[n, p, d], in plain numpy.
  Up to 4 input channels (the stem) all taps are one matmul; above, one matmul per kernel row."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, hw, hw + 1, c)).astype(np.float32)
  (ph, ho), (pw, wo) = conv_matmul.same_pads(hw, k, stride), conv_matmul.same_pads(hw + 1, k, stride)
  dy = rng.normal(size=(2, ho, wo, 5)).astype(np.float32)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  ref = np.zeros((k, k, c, 5))
  for i in range(k):
    for j in range(k):
      win = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      ref[i, j] = np.einsum("nhwc,nhwd->cd", win, dy)
  got = cpu_ops.conv_weight_grad_by_taps(jnp.asarray(x), jnp.asarray(dy), (k, k, c, 5), stride)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_winograd_matches_numpy_correlation():
  """y[n, h, w, o] = sum over taps (i, j) and c of xpad[n, h + i, w + j, c] * k[i, j, c, o], in plain numpy."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 10, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + 6, j:j + 10], k[i, j]) for i in range(3) for j in range(3))
  np.testing.assert_allclose(winograd.conv3x3(jnp.asarray(x), jnp.asarray(k)), ref, rtol=1e-5, atol=1e-5)
  assert not winograd.fits((2, 7, 10, 3), k.shape, 1)  # odd maps and strides keep another lowering
  assert not winograd.fits(x.shape, k.shape, 2)


def test_winograd_weight_grad_matches_numpy_correlation():
  """dW[i, j, c, d] = sum over n, h, w of xpad[n, h + i, w + j, c] * dy[n, h, w, d], in plain numpy, on a
  non-square map whose tile grid differs in height and width."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 10, 3)).astype(np.float32)
  dy = rng.normal(size=(2, 6, 10, 5)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.stack(
      [np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + 6, j:j + 10], dy) for j in range(3)]) for i in range(3)])
  got = winograd.conv3x3_weight_grad(jnp.asarray(x), jnp.asarray(dy))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_decoder_upsampling_is_nearest_neighbour():
  """The decoder's x2 upsampling (a broadcast) equals `jax.image.resize(..., "nearest")`."""
  x = jax.random.normal(jax.random.key(4), (2, 3, 5, 4))
  b, h, w, c = x.shape
  ours = models.upsample2x(x)
  np.testing.assert_array_equal(ours, jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest"))


def test_upsampled_conv_matches_numpy_upsample_then_correlate():
  """conv(upsample2x(x)) in numpy (np.repeat, then a 3x3 correlation with zero padding), on an odd, non-square
  map so that every border phase is checked; gradients against XLA's convolution of the upsampled map."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  k = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  up = np.pad(x.repeat(2, axis=1).repeat(2, axis=2), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = sum(np.einsum("nhwc,co->nhwo", up[:, i:i + 6, j:j + 10], k[i, j]) for i in range(3) for j in range(3))
  np.testing.assert_allclose(cpu_ops.conv3x3_upsampled(jnp.asarray(x), jnp.asarray(k)), ref, rtol=1e-5, atol=1e-5)
  y, vjp = jax.vjp(cpu_ops.conv3x3_upsampled, jnp.asarray(x), jnp.asarray(k))
  vjp_ref = jax.vjp(lambda x, k: lax_conv(models.upsample2x(x), k, 1), jnp.asarray(x), jnp.asarray(k))[1]
  g = jax.random.normal(jax.random.key(9), y.shape)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["cpu", "xla"])
@pytest.mark.parametrize("with_skip", [True, False])
def test_upsampling_conv_module_matches_flax_conv_of_the_concatenation(with_skip, conv_impl):
  """The decoder's `up_conv(x, skip)` is `nn.Conv` of `concat([upsample2x(x), skip])`: same parameters, same output
  and gradients, for the CPU layers (the low-res computation) and the plain Flax ones (upsample, concatenate,
  `nn.Conv`)."""
  kx, ks = jax.random.split(jax.random.key(5))
  x, skip = jax.random.normal(kx, (2, 4, 3, 6)), jax.random.normal(ks, (2, 8, 6, 5)) if with_skip else None
  conv = models.layers(conv_impl)["up_conv"](7, (3, 3), use_bias=False)
  variables = conv.init(jax.random.key(6), x, skip)
  concat = lambda x, skip: models.upsample2x(x) if skip is None else jnp.concatenate([models.upsample2x(x), skip], -1)
  ref = nn.Conv(7, (3, 3), padding="SAME", use_bias=False)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(jax.random.key(6), concat(x, skip)))
  y, vjp = jax.vjp(lambda v, x, skip: conv.apply(v, x, skip), variables, x, skip)
  y_ref, vjp_ref = jax.vjp(lambda v, x, skip: ref.apply(v, concat(x, skip)), variables, x, skip)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(10), y.shape)
  for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_ref(g))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_cpu_upsampling_conv_takes_a_bias_like_nn_conv():
  """With a bias (not in the models, but an `nn.Conv` argument), the same `kernel` and `bias` and output."""
  x, skip = jax.random.normal(jax.random.key(11), (1, 3, 3, 4)), jax.random.normal(jax.random.key(12), (1, 6, 6, 2))
  conv, ref = cpu_ops.UpsampleConv(5, (3, 3), bias_init=nn.initializers.normal()), models.UpsampleConv(5, (3, 3))
  variables = conv.init(jax.random.key(13), x, skip)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(jax.random.key(13), x, skip))
  np.testing.assert_allclose(conv.apply(variables, x, skip), ref.apply(variables, x, skip), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="3x3, stride 1"):
    cpu_ops.UpsampleConv(5, (3, 3), strides=2).init(jax.random.key(0), x, skip)


# Compile time dominates on CPU; the least-optimising XLA backend halves it
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["resnet18", "plain"])
def test_cpu_layers_make_the_same_unet_as_flax_layers(encoder):
  """A U-Net built with the CPU lowerings (conv_impl='cpu') and with plain Flax's (conv_impl='xla') has one
  parameter tree, and the same outputs, BatchNorm statistics and parameter gradients in train mode. Every
  lowering runs here: Winograd, im2col and XLA's convolutions, per-tap weight gradients, the decoder's
  up-convolutions and the stem pool. Four images: with two, ResNet's 2x2 last stage normalises over so few values
  that fp32 gradients of either model are 0.5% off their float64 values (and of each other)."""
  x = jax.random.normal(jax.random.key(14), (4, 32, 32, 1))
  cpu, xla = (models.UNet(encoder=encoder, **models.layers(impl)) for impl in ("cpu", "xla"))
  variables = cpu.init(jax.random.key(0), x, train=False)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, xla.init(jax.random.key(0), x, train=False))

  def loss(model, params):
    y, new = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape)), (y, new["batch_stats"])

  (_, (y, stats)), grads = fast_jit(jax.value_and_grad(functools.partial(loss, cpu), has_aux=True))(variables["params"])
  (_, (y_ref, stats_ref)), grads_ref = fast_jit(jax.value_and_grad(functools.partial(loss, xla),
                                                                   has_aux=True))(variables["params"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6  # each leaf against its largest gradient
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 5, 3)])
def test_max_pool_matches_flax_with_the_first_maximum_taking_the_gradient(shape):
  """Value and gradient of `nn.max_pool` (3x3, stride 2, padding 1), on even and odd maps with many ties
  (zeros and repeated values, as after a ReLU), where the gradient must go to one element per window only."""
  x = jax.random.normal(jax.random.key(7), shape)
  x = jnp.where(x < 0, 0.0, jnp.round(2 * x))
  y, vjp = jax.vjp(cpu_ops.max_pool_3x3_s2, x)
  y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))), x)
  np.testing.assert_array_equal(y, y_ref)
  g = jax.random.normal(jax.random.key(8), y.shape)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(g)[0].sum(), g.sum(), rtol=1e-5)  # each window's gradient lands once


# ---------------------------------------------------------------------------------------------------- bf16
def rel_err(got, ref) -> float:
  """Largest error against the largest reference value."""
  return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


# bf16 keeps 8 significant bits: each operand is rounded by up to 2^-9 (0.2%), and Winograd rounds its
# transformed operands, sums of up to 16 values. Measured: 0.1-0.5% of the largest value.
BF16_TOL = 1e-2


def conv_highest(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")


def dot_operand_types(compiled_text: str) -> set[str]:
  """The element types of every matmul operand in XLA's optimised HLO text."""
  types = set()
  for line in compiled_text.splitlines():
    if " dot(" in line:
      for name in line.split(" dot(")[1].split(")")[0].split(", "):
        types.add(re.search(re.escape(name) + r" = (\w+)\[", compiled_text).group(1))
  return types


def conv_and_grads_highest(x_shape, k_shape, stride):
  """Random f32 (x, kernel, output gradient) and XLA's f32 convolution and gradients of them, at the highest
  precision."""
  kx, kw, kd = jax.random.split(jax.random.key(20), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, k_shape) / np.sqrt(np.prod(k_shape[:3]))
  y_ref, vjp_ref = jax.vjp(lambda x, w: conv_highest(x, w, stride), x, w)
  dy = jax.random.normal(kd, y_ref.shape)
  return (x, w, dy), (y_ref, *vjp_ref(dy))


@pytest.mark.parametrize("x_shape,k_shape,stride", PATH_CASES)
def test_bf16_cpu_conv_matches_f32_within_bf16_rounding(x_shape, k_shape, stride):
  """The custom-VJP convolution with bf16 matmul operands (whichever lowering and operand dtype each pass takes
  for the shape), on the f32 arrays the models give it, against XLA's f32 convolution and its gradients at the
  highest precision. Results stay f32 (f32 sums)."""
  (x, w, dy), refs = conv_and_grads_highest(x_shape, k_shape, stride)
  conv = lambda x, w: cpu_ops.cpu_conv(x, w, stride, jnp.dtype(jnp.bfloat16))
  got_all = fast_jit(lambda x, w, dy: (lambda y, vjp: (y, *vjp(dy)))(*jax.vjp(conv, x, w)))(x, w, dy)
  for got, ref in zip(got_all, refs):
    assert got.dtype == jnp.float32 and rel_err(got, ref) < BF16_TOL


@pytest.mark.slow
@pytest.mark.parametrize("x_shape,k_shape,stride", PATH_CASES)
def test_bf16_lowerings_of_each_pass_match_f32_within_bf16_rounding(x_shape, k_shape, stride):
  """Every lowering of every pass with bf16 matmul operands against XLA's f32 convolution and gradients, also
  those `cpu_conv_paths` does not choose for the shape (the choice may move with new measurements)."""
  (x, w, dy), (y_ref, dx_ref, dw_ref) = conv_and_grads_highest(x_shape, k_shape, stride)
  bf16 = jnp.dtype(jnp.bfloat16)
  paths = ("lax", "matmul") + (("winograd",) if winograd.fits(x_shape, k_shape, stride) else ())
  for path in paths:
    y = fast_jit(lambda x, w: cpu_ops.conv_by(path)(x, w, stride, bf16))(x, w)
    dx = fast_jit(lambda dy, x, w: cpu_ops.conv_input_grad(path, dy, x, w, stride, bf16))(dy, x, w)
    assert y.dtype == dx.dtype == jnp.float32
    assert rel_err(y, y_ref) < BF16_TOL, path
    assert rel_err(dx, dx_ref) < BF16_TOL, path
  for path in paths + ("taps",):
    dw = fast_jit(lambda dy, x, w: cpu_ops.conv_weight_grad(path, dy, x, w, stride, bf16))(dy, x, w)
    assert dw.dtype == jnp.float32
    assert rel_err(dw, dw_ref) < BF16_TOL, path


def test_bf16_keeps_f32_operands_where_bf16_is_slower():
  """bf16 everywhere except Winograd's input gradient with matmuls under 256 rows and the stem's weight
  gradient (`cpu_conv_dtypes`); f32 stays f32."""
  f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  assert cpu_ops.cpu_conv_dtypes((16, 4, 4, 512), (3, 3, 512, 512), 1, bf16) == (bf16, f32, bf16)  # 64 rows
  assert cpu_ops.cpu_conv_dtypes((16, 8, 8, 256), (3, 3, 256, 256), 1, bf16) == (bf16,) * 3  # 256 rows
  assert cpu_ops.cpu_conv_dtypes((16, 128, 128, 1), (7, 7, 1, 64), 2, bf16) == (bf16, bf16, f32)
  assert cpu_ops.cpu_conv_dtypes((16, 4, 4, 512), (3, 3, 512, 512), 1, f32) == (f32,) * 3
  # the 128x128 stage's weight gradient: taps with bf16 operands, XLA's convolution in f32 (and for the head)
  assert cpu_ops.cpu_conv_paths((16, 128, 128, 16), (3, 3, 16, 16), 1, bf16)[2] == "taps"
  assert cpu_ops.cpu_conv_paths((16, 128, 128, 16), (3, 3, 16, 16), 1, f32)[2] == "lax"
  assert cpu_ops.cpu_conv_paths((16, 128, 128, 16), (3, 3, 16, 1), 1, bf16)[2] == "lax"


def test_bf16_matmuls_stay_bf16_in_every_pass():
  """XLA:CPU does a bf16 matmul in f32 unless both operands are row-major; the transposed kernels of the input
  gradients (Winograd, im2col) are copied row-major so that it does not (`precision.row_major`)."""
  if jax.default_backend() != "cpu":
    pytest.skip("XLA:CPU's lowering")
  x, w = jnp.ones((16, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
  for stride in (1, 2):  # Winograd in all three passes; im2col forward and input gradient, taps weight gradient
    step = jax.jit(jax.grad(lambda x, w: jnp.sum(cpu_ops.cpu_conv(x, w, stride, jnp.dtype(jnp.bfloat16))), (0, 1)))
    assert dot_operand_types(step.lower(x, w).compile().as_text()) == {"bf16"}, stride


def test_bf16_upsampled_conv_matches_f32_within_bf16_rounding():
  """`conv3x3_upsampled` with bf16 operands against numpy's float64 upsample-then-correlate, and its gradients
  against XLA's f32 convolution of the upsampled map."""
  rng = np.random.default_rng(21)
  x, k = jnp.asarray(rng.normal(size=(2, 3, 5, 8)), jnp.float32), jnp.asarray(rng.normal(size=(3, 3, 8, 6)) / 8,
                                                                               jnp.float32)
  x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
  up = np.pad(x64.repeat(2, axis=1).repeat(2, axis=2), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = sum(np.einsum("nhwc,co->nhwo", up[:, i:i + 6, j:j + 10], k64[i, j]) for i in range(3) for j in range(3))
  y, vjp = jax.vjp(lambda x, k: cpu_ops.conv3x3_upsampled(x, k, jnp.dtype(jnp.bfloat16)), x, k)
  assert y.dtype == jnp.float32 and rel_err(y, ref) < BF16_TOL
  g = jax.random.normal(jax.random.key(22), y.shape)
  refs = jax.vjp(lambda x, k: conv_highest(models.upsample2x(x), k, 1), x, k)[1](g)
  for got, ref in zip(vjp(g), refs):
    assert got.dtype == jnp.float32 and rel_err(got, ref) < BF16_TOL


@pytest.mark.slow
def test_bf16_unet_from_config_matches_the_f32_one():
  """model.dtype='bfloat16' on the CPU lowerings: the same parameters, f32 modules and outputs; outputs and
  BatchNorm statistics within a few bf16 roundings of the f32 network's after 20 layers, and every parameter
  gradient pointing the f32 one's way (cosine >= 0.93; measured 0.97, where Flax's own bf16 modules with XLA's
  layers fall below 0.93). 64 px and 8 images: at 32 px, ResNet's last stage is 1x1 and its BatchNorm over
  a few values amplifies any rounding."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU lowerings")
  cfg = default.get_config().model
  f32 = models.unet_from_config(cfg)
  cfg.dtype = "bfloat16"
  bf16 = models.unet_from_config(cfg)
  assert bf16.dtype == jnp.float32 and bf16.up_conv.keywords["matmul_dtype"] == jnp.bfloat16
  x = jax.random.normal(jax.random.key(15), (8, 64, 64, 1))
  variables = f32.init(jax.random.key(0), x, train=False)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, bf16.init(jax.random.key(0), x, train=False))

  def loss(model, params):
    y, new = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape)), (y, new["batch_stats"])

  step = lambda model: fast_jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True))
  (_, (y, stats)), grads = step(bf16)(variables["params"])
  (_, (y_ref, stats_ref)), grads_ref = step(f32)(variables["params"])
  assert y.dtype == jnp.float32 and rel_err(y, y_ref) < 0.05
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    assert rel_err(a, b) < 0.02
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
    a, b = a.ravel(), b.ravel()
    if jnp.any(b != 0):  # a cosine needs a nonzero f32 gradient
      cosine = float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
      assert cosine >= 0.93, (jax.tree_util.keystr(path), cosine)
