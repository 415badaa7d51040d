"""Transfer of pre-trained weights between models of different input channels (natural RGB -> grayscale)."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from usjax import checkpoint, models


def random_variables(channels, seed):
  """Variables of a ResNet-18 U-Net as random numpy arrays (shapes only: nothing is compiled)."""
  shapes = jax.eval_shape(lambda: models.UNet().init(jax.random.key(0), jnp.zeros((1, 32, 32, channels)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("src,dst", [(3, 1), (1, 3)])
def test_stem_is_converted_between_channel_counts(tmp_path, src, dst):
  saved = random_variables(src, 0)
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  mngr.save(
      1, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": saved["params"], "batch_stats": saved["batch_stats"]})))
  mngr.wait_until_finished()
  fresh = random_variables(dst, 1)
  params, stats, report = checkpoint.load_pretrained(str(tmp_path), fresh["params"], fresh["batch_stats"], ("encoder",))
  k = saved["params"]["encoder"]["stem"]["kernel"]
  expect = k.sum(2, keepdims=True) if dst == 1 else np.repeat(k.mean(2, keepdims=True), dst, 2)
  np.testing.assert_allclose(params["encoder"]["stem"]["kernel"], expect, rtol=1e-6)
  np.testing.assert_array_equal(params["encoder"]["layer1_0"]["Conv_0"]["kernel"],
                                saved["params"]["encoder"]["layer1_0"]["Conv_0"]["kernel"])
  np.testing.assert_array_equal(params["decoder"]["up0"]["Conv_0"]["kernel"],
                                fresh["params"]["decoder"]["up0"]["Conv_0"]["kernel"])
  assert fresh["params"]["encoder"]["stem"]["kernel"].shape[2] == dst  # the caller's tree is untouched
  assert report["loaded"] == ["encoder"]
