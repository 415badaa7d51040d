"""Probes: k-NN and linear probes against plain formulas, collapse statistics; encoder features and probe data
(`probe_data`)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from usjax import UsjaxError, checkpoint, models, probe_data, probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


# ---------------------------------------------------------------------------------------------------- probes
def knn_reference(train, train_labels, test, num_classes, k, temperature):
  """InstDisc's weighted k-NN written out one test point at a time."""
  out = []
  for q in test:
    sims = [float(np.dot(q, t) / (np.linalg.norm(q) * np.linalg.norm(t))) for t in train]
    order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * num_classes
    for i in order:
      votes[train_labels[i]] += np.exp(sims[i] / temperature)
    out.append(int(np.argmax(votes)))
  return np.array(out)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (500, 0.1)])
def test_knn_matches_reference(k, temperature):
  rng = np.random.default_rng(k)
  centres = rng.normal(size=(4, 16))
  train_labels = rng.integers(0, 4, 120)
  train = centres[train_labels] + 1.5 * rng.normal(size=(120, 16))
  test = centres[rng.integers(0, 4, 40)] + 1.5 * rng.normal(size=(40, 16))
  got = probes.knn_predict(train.astype(np.float32), train_labels, test.astype(np.float32), 4, k, temperature)
  want = knn_reference(train.astype(np.float32), train_labels, test.astype(np.float32), 4, min(k, 120), temperature)
  np.testing.assert_array_equal(got, want)


def test_accuracy_and_balanced_accuracy():
  labels = np.array([0] * 8 + [1] * 2)
  majority = np.zeros(10, int)
  assert probes.accuracy(majority, labels) == 0.8
  assert probes.balanced_accuracy(majority, labels) == 0.5  # recall 1 on class 0, 0 on class 1
  assert probes.balanced_accuracy(labels, labels) == 1.0


def test_linear_probe_separable_and_shuffled():
  rng = np.random.default_rng(0)
  centres = 4.0 * rng.normal(size=(3, 32))
  y, y_test = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
  x = centres[y] + rng.normal(size=(300, 32))
  x_test = centres[y_test] + rng.normal(size=(300, 32))
  got = probes.linear_accuracy(x, y, x_test, y_test, 3)
  assert got == {"acc": 1.0, "bacc": 1.0}
  again = probes.linear_probe(x, y, x_test, 3)
  np.testing.assert_array_equal(again, probes.linear_probe(x, y, x_test, 3))  # deterministic
  # Labels that carry no information: the fit memorises the training set, the held-out set stays at chance.
  noise = probes.linear_accuracy(x, rng.permutation(y), x_test, rng.permutation(y_test), 3, balanced=True)
  assert 0.2 < noise["acc"] < 0.47 and 0.2 < noise["bacc"] < 0.47


def test_embedding_stats_and_collapse():
  rng = np.random.default_rng(0)
  d = 128
  collapsed = np.ones((256, d)) + 1e-4 * rng.normal(size=(256, d))
  stats = probes.embedding_stats(collapsed)
  assert stats["z_std_ideal"] == pytest.approx(1 / np.sqrt(d))
  assert float(stats["z_std"]) < 0.01 * stats["z_std_ideal"] and probes.collapsed(stats)
  stats = probes.embedding_stats(rng.normal(size=(1024, d)))
  assert float(stats["z_std"]) == pytest.approx(1 / np.sqrt(d), rel=0.03) and not probes.collapsed(stats)
  jitted = jax.jit(lambda z: probes.embedding_stats(z)["z_std"])(jnp.asarray(collapsed, jnp.float32))
  assert float(jitted) == pytest.approx(float(probes.embedding_stats(collapsed)["z_std"]), abs=1e-6)


def test_alignment_and_uniformity_match_numpy():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(24, 8)), rng.normal(size=(24, 8))
  n1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  n2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  for alpha in (1.0, 2.0):
    want = np.mean(np.linalg.norm(n1 - n2, axis=1)**alpha)
    assert float(probes.alignment(z1, z2, alpha)) == pytest.approx(want, rel=1e-5)
  for t in (1.0, 2.0):
    pairs = [np.exp(-t * np.sum((n1[i] - n1[j])**2)) for i in range(24) for j in range(i + 1, 24)]
    assert float(probes.uniformity(z1, t)) == pytest.approx(np.log(np.mean(pairs)), rel=1e-4)
  assert float(probes.alignment(z1, 3 * z1)) == pytest.approx(0.0, abs=1e-6)
  assert float(probes.uniformity(np.ones((10, 8)))) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- features
def random_variables(tree, seed=0):
  """He-normal kernels, unit BatchNorm scales and variances, zero biases and means for the shapes in `tree`:
  a random network without compiling `init` (its random-number graph takes longer to compile than the forward
  pass)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if a.ndim > 1:
      return (rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))).astype(a.dtype)
    return np.full(a.shape, 1.0 if name in ("scale", "var") else 0.0, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


@pytest.fixture(scope="module")
def synthetic_probe(tmp_path_factory):
  """ProbeData on a tiny synthetic breast set (42 train / 6 val images, 3 classes) with a random resnet18."""
  cfg = default.get_config()
  cfg.data.data_dir = str(tmp_path_factory.mktemp("probe_data"))
  cfg.data.image_size = cfg.data.synthetic_size = 32
  cfg.data.synthetic_num_images = 60
  probe = probe_data.ProbeData(cfg.data, cfg.model, names=("synthetic_breast",), batch_size=16)
  shapes = jax.eval_shape(lambda: probe.encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
  return cfg, probe, random_variables(shapes)


def test_encoder_variables_from_unet_and_pretrain_trees():
  x = jnp.zeros((1, 32, 32, 1))
  encoder = probe_data.build_encoder({"encoder": "resnet18", "norm": "batch"})
  want = jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, train=False)))
  for net in (models.UNet(), models.PretrainNet(proj_dims=(64, 16), pred_dims=(32, 16))):
    tree = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
    assert jax.tree.map(lambda a: a.shape, probe_data.encoder_variables(tree)) == want


def test_encoder_features_padded_batches_and_deterministic(synthetic_probe):
  _, probe, variables = synthetic_probe
  images = probe.sets["synthetic_breast"].train_images[:21]  # 16 + a last batch of 5 padded to 16
  a = probe_data.encoder_features(probe.forward, variables, images, batch_size=16)
  b = probe_data.encoder_features(probe.forward, variables, images[16:], batch_size=16)
  assert a.shape == (21, 512) and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_allclose(a[16:], b, rtol=1e-5, atol=1e-6)  # padding and batch neighbours change nothing
  np.testing.assert_array_equal(a, probe_data.encoder_features(probe.forward, variables, images, batch_size=16))
  assert probe.forward._cache_size() == 1  # one compile for every batch


def test_probe_data_run(synthetic_probe):
  cfg, probe, variables = synthetic_probe
  s = probe.sets["synthetic_breast"]
  assert s.class_names == ("benign", "malignant", "normal")
  assert s.train_images.shape == (42, 32, 32, 1) and s.train_images.dtype == np.uint8 and len(s.eval_labels) == 6
  unet = models.UNet()
  tree = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
  full = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)  # a whole U-Net tree ...
  full["params"]["encoder"], full["batch_stats"]["encoder"] = variables["params"], variables["batch_stats"]
  metrics = probe.run(full)  # ... reads its encoder
  assert metrics == pytest.approx({**probe.run(variables), "probe/seconds": metrics["probe/seconds"]})
  for key in ("knn_acc", "knn_bacc", "linear_acc", "linear_bacc"):
    assert 0 <= metrics[f"probe/synthetic_breast_{key}"] <= 1
  assert metrics["probe/synthetic_breast_z_std"] > 0
  assert probe.describe()["synthetic_breast"]["train_counts"] == [19, 13, 10]
  # Classes with too few training examples are left out and the labels renumbered.
  few = probe_data.probe_sets(cfg.data, ("synthetic_breast",), min_train=11)["synthetic_breast"]
  assert few.class_names == ("benign", "malignant") and set(few.train_labels) == {0, 1}


def test_sources_without_a_folder_are_skipped(synthetic_probe):
  cfg, _, _ = synthetic_probe
  assert probe_data.probe_sets(cfg.data, ("busi", "pocus")) == {}
  with pytest.raises(probe_data.ProbeError, match="busi_dir"):
    probe_data.ProbeData(cfg.data, cfg.model, names=("busi",))


def test_load_encoder_reads_a_pretraining_checkpoint(tmp_path):
  net = models.PretrainNet(proj_dims=(64, 16))
  tree = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
  variables = random_variables(tree)
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"], "step": np.int32(3)}
  mngr = checkpoint.manager(str(tmp_path / "run" / "checkpoints"))
  checkpoint.save(mngr, 3, state, {"task": "pretrain", "model": default.get_config().model.to_dict()})
  mngr.wait_until_finished()
  mngr.close()
  got, meta, path = probe_data.load_encoder(str(tmp_path / "run"), 32, 1)
  assert meta["task"] == "pretrain" and path.endswith(os.path.join("checkpoints", "3"))
  jax.tree.map(np.testing.assert_array_equal, got, probe_data.encoder_variables(variables))
  with pytest.raises(probe_data.ProbeError, match="stem"):
    probe_data.load_encoder(str(tmp_path / "run"), 32, 3)
  with pytest.raises(probe_data.ProbeError, match="no checkpoint"):
    probe_data.load_encoder(str(tmp_path), 32, 1)
  with pytest.raises(probe_data.ProbeError, match="no checkpoint of step 4 \\(has 3\\)"):
    probe_data.load_encoder(str(tmp_path / "run"), 32, 1, step=4)


def test_launch_reports_bad_input_in_one_line(tmp_path):
  out = subprocess.run([sys.executable,
                        os.path.join(ROOT, "launch", "probe.py"), f"--workdir={tmp_path / 'nope'}"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: workdir not found"
  assert issubclass(probe_data.ProbeError, UsjaxError)


# ---------------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_busi_and_pocus(tmp_path_factory):
  for name in ("busi", "pocus"):
    if not os.path.isdir(os.path.join(SHARED, name)):
      pytest.skip(f"shared data {os.path.join(SHARED, name)} not present")
  cfg = default.get_config()
  cfg.data.data_dir = str(tmp_path_factory.mktemp("probe_real"))
  cfg.data.busi_dir, cfg.data.pocus_dir = os.path.join(SHARED, "busi"), os.path.join(SHARED, "pocus")
  cfg.data.image_size = 32
  probe = probe_data.ProbeData(cfg.data, cfg.model)
  assert probe.sets["busi"].class_names == ("benign", "malignant", "normal")
  assert probe.sets["pocus"].class_names == ("covid", "regular")  # 2 pneumonia images: left out
  shapes = jax.eval_shape(lambda: probe.encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
  variables = random_variables(shapes)
  metrics = probe.run(variables)
  described = probe.describe()
  for name, (train_f, eval_f) in probe.features(variables).items():
    s = probe.sets[name]
    assert described[name]["eval"] == len(eval_f) > 50
    # k-NN: the one-point-at-a-time reference on the same features, scored by per-class recall written out.
    want = knn_reference(train_f, s.train_labels, eval_f, len(s.class_names), min(probe.k, len(train_f)),
                         probe.temperature)
    recall = [np.mean(want[s.eval_labels == c] == c) for c in np.unique(s.eval_labels)]
    assert metrics[f"probe/{name}_knn_acc"] == pytest.approx(np.mean(want == s.eval_labels))
    assert metrics[f"probe/{name}_knn_bacc"] == pytest.approx(np.mean(recall))
    # Linear: the fitted probe's labels, scored the same way.
    pred = probes.linear_probe(train_f, s.train_labels, eval_f, len(s.class_names), probe.l2, probe.steps,
                               probe.balanced)
    recall = [np.mean(pred[s.eval_labels == c] == c) for c in np.unique(s.eval_labels)]
    assert metrics[f"probe/{name}_linear_bacc"] == pytest.approx(np.mean(recall))
