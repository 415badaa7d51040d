"""`flops.step_flops` against FLOP counts worked out by hand."""
import jax
import jax.numpy as jnp
import numpy as np

from usjax import cpu_ops, flops, models, winograd


def test_matmul_and_its_gradient():
  x, w = jnp.ones((8, 32)), jnp.ones((32, 16))
  fwd = 2 * 8 * 32 * 16
  assert flops.step_flops(lambda x, w: x @ w, x, w) == fwd
  # d/dx and d/dw are two more products of the same size; without the value, the forward product is dead code
  loss = lambda x, w: jnp.sum(x @ w)
  assert flops.step_flops(jax.value_and_grad(loss, argnums=(0, 1)), x, w) == 3 * fwd
  assert flops.step_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 2 * fwd


def test_convolution_strided_and_grouped():
  x = jnp.ones((2, 16, 16, 6))
  k = jnp.ones((3, 3, 6, 4))
  # SAME, stride 2: 8x8 outputs of 4 features, each a 3x3x6 window
  assert flops.step_flops(lambda x, k: cpu_ops.lax_conv(x, k, 2), x, k) == 2 * 2 * 8 * 8 * 4 * (3 * 3 * 6)
  kg = jnp.ones((3, 3, 2, 6))  # 3 groups of 2 input features
  grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=3, dimension_numbers=(
      "NHWC", "HWIO", "NHWC"))
  assert flops.step_flops(grouped, x, kg) == 2 * 2 * 16 * 16 * 6 * (3 * 3 * 2)


def test_nested_jit_scan_and_cond():
  w = jnp.ones((4, 4))
  mm = 2 * 4 * 4 * 4

  def body(c, _):
    return jax.jit(lambda c: c @ w)(c), None

  scanned = lambda c: jax.lax.scan(body, c, None, length=5)[0]
  assert flops.step_flops(scanned, jnp.ones((4, 4))) == 5 * mm
  branchy = lambda p, c: jax.lax.cond(p, lambda c: c @ w @ w, lambda c: c, c)
  assert flops.step_flops(branchy, True, jnp.ones((4, 4))) == 2 * mm


def test_resnet18_forward_matches_the_known_count():
  """ResNet-18 on a 3-channel 224x224 image: 1.8 G multiply-adds (He et al. 2016, Table 1), all but 0.5 M of
  them (the classifier, absent here) in the convolutions. Counted with the plain Flax layers (XLA's convolution in
  every pass, as an accelerator runs it; the CPU lowerings turn some into Winograd convolutions, which do fewer)."""
  enc = models.ResNetEncoder(depth=18, norm="batch")  # the default layers: plain Flax
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(lambda: enc.init(jax.random.key(0), x, False))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  count = flops.step_flops(lambda p, x: enc.apply(p, x, False), params, x)
  np.testing.assert_allclose(count / 2, 1.81e9, rtol=0.01)


def test_winograd_counts_the_multiplies_it_does():
  """F(2x2, 3x3) does 16 multiplies per 2x2 outputs where the direct convolution does 36. The kernel's
  transform G g G^T is elementwise sums (`winograd._kernel`), not counted like other elementwise work."""
  x, k = jnp.ones((2, 16, 16, 64)), jnp.ones((3, 3, 64, 64))
  direct = 2 * 2 * 16 * 16 * 64 * (3 * 3 * 64)
  np.testing.assert_allclose(flops.step_flops(winograd.conv3x3, x, k), direct * 16 / 36, rtol=1e-9)
  dy = jnp.ones((2, 16, 16, 64))  # the weight gradient: 16 (C, tiles) @ (tiles, D) matmuls, as many multiplies
  np.testing.assert_allclose(flops.step_flops(winograd.conv3x3_weight_grad, x, dy), direct * 16 / 36, rtol=1e-9)


def test_dead_code_is_not_counted():
  """Under value_and_grad a custom-VJP convolution's forward pass is traced twice and XLA keeps one."""
  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))
  fwd = 2 * 2 * 16 * 16 * 8 * (3 * 3 * 8)
  for conv in (cpu_ops.lax_conv, cpu_ops.cpu_conv):
    step = jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k, 1)), argnums=(0, 1))
    assert flops.step_flops(step, x, k) == 3 * fwd, conv
  assert flops.step_flops(lambda x: (x @ x, 2 * x)[1], jnp.ones((4, 4))) == 0


def test_strided_convolution_gradients_cost_what_the_forward_does():
  """The input gradient of a stride-2 convolution runs on a 2x-dilated output gradient: 3 of its 4 inputs
  are zeros, so it costs one forward pass (as the weight gradient does), not four."""
  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4))
  fwd = 2 * 2 * 8 * 8 * 4 * (3 * 3 * 8)
  step = jax.value_and_grad(lambda x, k: jnp.sum(cpu_ops.lax_conv(x, k, 2)), argnums=(0, 1))
  np.testing.assert_allclose(flops.step_flops(step, x, k), 3 * fwd, rtol=1e-9)
