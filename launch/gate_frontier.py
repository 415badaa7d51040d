"""What any presence gate could do for a finished run: the frontier of false lesions on normal scans against the
lesion-image Dice they cost (usjax.postprocess.gate_frontier).

    python launch/gate_frontier.py results/finetune_busi_real/presence_128_seed0
    python launch/gate_frontier.py runs/busi_presence_128/per_image.json --max_fpr=0.05 --budget=0.01
    python launch/gate_frontier.py runs/busi_presence_128/best/val_per_image.json   # what validation showed

Reads a run's per_image.json (the split it scored, usually test) and, for each score it holds (the head's
presence probability, the mask's peak probability), prints the operating points no other threshold beats, then the
two answers a target needs: the least lesion-Dice cost of reaching --max_fpr, and the lowest false-positive rate
within --budget (--out=FILE writes them as JSON). The run's own gate was chosen on validation, whose per-image scores (masks at 0.5, ungated) a run
with the head or post-processing keeps in best/val_per_image.json; on a test split the frontier only says whether
any gate could have met the target for this model, and is not a way to choose one.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_float("max_fpr", 0.05, "Target share of normal scans with a false lesion.")
flags.DEFINE_float("budget", 0.01, "Lesion-image Dice a gate may cost.")
flags.DEFINE_string("out", None, "Optional JSON file for the frontiers and the two answers.")

SCORES = (("head", "presence"), ("peak", "max_prob"))  # (name, per_image.json key)


def main(argv):
  from usjax import postprocess
  from usjax.claims import markdown
  if len(argv) != 2:
    raise app.UsageError("usage: launch/gate_frontier.py RUN_DIR|per_image.json [--max_fpr=0.05] [--budget=0.01]")
  path = argv[1] if argv[1].endswith(".json") else os.path.join(argv[1], "per_image.json")
  try:
    with open(path) as f:
      rows = json.load(f)
    dices, empty = [float(r["dice"]) for r in rows], [not r["lesion"] for r in rows]
  except (OSError, ValueError, TypeError, KeyError) as e:
    sys.exit(f"gate_frontier: {path}: unreadable per-image scores ({type(e).__name__}: {e})")
  fl = flags.FLAGS
  print(f"{path}: {len(rows)} images, {sum(empty)} normal; target: false lesions on <= {fl.max_fpr:.0%} of "
        f"normal scans at a lesion-Dice cost <= {fl.budget:g}\n")
  out = {"per_image": path, "max_fpr": fl.max_fpr, "budget": fl.budget, "gates": {}}
  for name, key in SCORES:
    if not all(r.get(key) is not None for r in rows):
      print(f"{name} ({key}): not recorded\n")
      continue
    front = postprocess.gate_frontier([float(r[key]) for r in rows], dices, empty)
    print(f"gate on the {name} ({key}):\n")
    print(markdown(["threshold", "false lesions on normal scans", "lesion Dice", "cost", "lesion masks emptied"],
                   [["off" if p["threshold"] is None else f"{p['threshold']:.4f}", f"{p['fpr']:.1%}",
                     f"{p['lesion_dice']:.3f}", f"{p['lesion_cost']:.3f}", str(p["lesions_emptied"])]
                    for p in front]), end="")
    need = postprocess.cheapest(front, fl.max_fpr)
    within = min((p for p in front if p["lesion_cost"] <= fl.budget + 1e-12), key=lambda p: p["fpr"])
    reach = "unreachable" if need is None else f"costs {need['lesion_cost']:.3f} of lesion Dice"
    verdict = "met" if need is not None and need["lesion_cost"] <= fl.budget + 1e-12 else "not met"
    print(f"\n{fl.max_fpr:.0%} false lesions: {reach}; within a cost of {fl.budget:g}: {within['fpr']:.1%} at best "
          f"-> target {verdict} by any gate on the {name}\n")
    out["gates"][name] = {"score": key, "frontier": front, "cheapest_at_max_fpr": need, "best_within_budget": within,
                          "target_met": verdict == "met"}
  if fl.out:
    os.makedirs(os.path.dirname(os.path.abspath(fl.out)), exist_ok=True)
    with open(fl.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
