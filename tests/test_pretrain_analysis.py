"""Has a pre-training flattened: the rule on hand-made histories; the pre-training table on fake run folders."""
import json
import math

from usjax import analysis
from usjax import pretrain_analysis as pa


def losses(values, every=25):
  return [{"step": every * (i + 1), "loss": v} for i, v in enumerate(values)]


def probes(values, every=100, key="busi_linear_bacc"):
  return [{"step": every * (i + 1), key: v, "pocus_linear_bacc": 0.9} for i, v in enumerate(values)]


def test_still_learning_is_not_flattened():
  # 400 steps, loss every 25: quarter (200, 300] averages 3.0, the last quarter (300, 400] 2.8 -> 6.7% fall.
  hist = losses([4.0] * 8 + [3.0] * 4 + [2.8] * 4)
  out = pa.flattening(hist, probes([0.60, 0.64, 0.70, 0.75]), steps=400)
  assert math.isclose(out["loss_drop"], 0.2 / 3.0)
  assert math.isclose(out["probe_gain"], 0.75 - 0.70)  # last probe against the best up to step 300
  assert out["metric"] == "busi_linear_bacc" and out["flattened"] is False


def test_flat_loss_and_probe():
  hist = losses([4.0] * 8 + [3.30] * 4 + [3.28] * 4)  # 0.6% fall
  out = pa.flattening(hist, probes([0.60, 0.68, 0.66, 0.67]), steps=400)
  assert out["probe_gain"] < 0 and out["flattened"] is True


def test_either_still_moving_means_not_flattened():
  flat_loss = losses([4.0] * 8 + [3.30] * 4 + [3.28] * 4)
  rising_probe = probes([0.60, 0.62, 0.64, 0.70])
  assert pa.flattening(flat_loss, rising_probe, steps=400)["flattened"] is False
  falling_loss = losses([4.0] * 8 + [3.3] * 4 + [3.0] * 4)
  assert pa.flattening(falling_loss, probes([0.6, 0.7, 0.7, 0.7]), steps=400)["flattened"] is False


def test_cannot_tell_without_a_late_probe():
  hist = losses([3.3] * 16)
  out = pa.flattening(hist, probes([0.6, 0.7]), steps=400)  # probes at 100, 200 only: none in the last quarter
  assert math.isnan(out["probe_gain"]) and out["flattened"] is None
  assert pa.flattening(hist, [], steps=400)["flattened"] is None


def test_probe_metric_prefers_busi_linear():
  assert pa.probe_metric(probes([0.5])) == "busi_linear_bacc"
  assert pa.probe_metric([{"step": 1, "pocus_linear_bacc": 0.9, "pocus_knn_bacc": 0.8}]) == "pocus_linear_bacc"
  assert pa.probe_metric([]) is None


def test_pretrain_table_puts_probe_and_flattening_beside_finetuning_gain(tmp_path):
  runs = {
      "breast": (0.55, 3.9, [4.0] * 8 + [3.0] * 4 + [2.8] * 4, [0.50, 0.52, 0.54, 0.55]),
      "multiorgan": (0.62, 3.4, [4.0] * 8 + [3.41] * 4 + [3.40] * 4, [0.60, 0.63, 0.62, 0.62]),
  }
  for name, (bacc, loss, hist, probe_curve) in runs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "history.json").write_text(json.dumps(losses(hist)))
    (tmp_path / name / "summary.json").write_text(
        json.dumps({
            "final_loss": loss, "collapsed": False, "steps": 400, "probe": {"busi_knn_bacc": bacc, "busi_knn_acc": 0.7},
            "probe_history": probes(probe_curve, key="busi_knn_bacc")
        }))
  stats = [{"pretrain": "none", "label_fraction": 100,
            "dice": 0.70}, {"pretrain": "breast", "label_fraction": 100, "dice": 0.72},
           {"pretrain": "multiorgan", "label_fraction": 100, "dice": 0.69}]
  md = analysis.pretrain_table({name: str(tmp_path / name) for name in runs}, stats, floor={"busi_knn_bacc": 0.42})
  lines = md.strip().splitlines()
  assert lines[0] == ("| pre-training | final loss | busi_knn_bacc | collapsed | loss fall, last 25% | "
                      "probe rise, last 25% | flattened | Δ Dice @ 100% |")
  assert lines[2] == "| random init (floor) | – | 0.420 | – | – | – | – | 0 |"
  assert lines[3] == "| breast | 3.900 | 0.550 | no | 6.7% | +0.010 | no | +0.020 |"
  assert lines[4] == "| multiorgan | 3.400 | 0.620 | no | 0.3% | -0.010 | yes | -0.010 |"
