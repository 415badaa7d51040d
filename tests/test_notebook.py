"""Runs launch/colab.ipynb's code cells, tiny, without IPython, so the notebook cannot drift from the code."""
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the Colab notebook's training cells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def code_cells(path: str) -> list[dict]:
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  return [c for c in nb["cells"] if c["cell_type"] == "code"]


def to_python(source: str) -> str:
  """`!cmd {expr}` lines -> `_sh(f"cmd {expr}")`, as IPython expands them; other magics are not allowed."""
  lines = []
  for line in source.splitlines():
    body = line.lstrip()
    assert not body.startswith("%"), f"magic in a code cell (write it in markdown): {line}"
    if body.startswith("!"):
      line = line[:len(line) - len(body)] + f"_sh(f{body[1:].strip()!r})"
    lines.append(line)
  return "\n".join(lines)


def test_bang_lines_become_shell_calls():
  assert to_python("x = 1\n!python a.py --w={RUNS}/p {EXTRA}") == \
      "x = 1\n_sh(f'python a.py --w={RUNS}/p {EXTRA}')"


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tiny = (f"--config.data.data_dir={tmp_path / 'data'} --config.data.image_size=32 --config.data.synthetic_size=32 "
          "--config.data.synthetic_num_images=40 --config.batch_size=8 --config.num_steps=2 --config.log_every=1 "
          "--config.checkpoint_every=2 --config.model.proj_dims=64,32")
  monkeypatch.setenv("USJAX_DEMO_ARGS", tiny)
  monkeypatch.setenv("USJAX_DEMO_DIR", str(tmp_path / "runs"))
  monkeypatch.chdir(ROOT)
  # `python` is this interpreter; XLA's cheapest CPU compilation, as compiling dominates these 2-step runs.
  env = {
      **os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
      "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  }

  def sh(cmd):
    subprocess.run(cmd, shell=True, check=True, cwd=ROOT, env=env, timeout=300)

  cells = code_cells(NOTEBOOK)
  assert any(re.search(r"^!pip install -q -r requirements.txt", "".join(c["source"]), re.M) for c in cells)
  namespace = {"_sh": sh, "__name__": "__main__"}
  for cell in cells:
    if "install" in cell["metadata"].get("tags", []):
      continue  # this environment is the installed one
    exec(compile(to_python("".join(cell["source"])), NOTEBOOK, "exec"), namespace)
  plt.close("all")
  runs = tmp_path / "runs"
  assert json.loads((runs / "finetune" / "summary.json").read_text())["transfer"]["loaded"] == ["encoder"]
  assert len(json.loads((runs / "finetune" / "history.json").read_text())) == 2
  summary = json.loads((runs / "predictions" / "summary.json").read_text())
  assert summary["num_images"] == len(list((runs / "my_scans").glob("*/*_mask.png")))
  assert len(namespace["paths"]) == 6 and all(p.endswith("_overlay.png") for p in namespace["paths"])
