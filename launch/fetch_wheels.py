"""Downloads the wheels the lent GPU machine needs: every package the project imports that its image lacks.

    .venv/bin/python launch/fetch_wheels.py [--out=.whl]

The GPU machine (Python 3.12, x86_64, no package index) has jax, flax, optax, orbax, numpy, scipy and the rest of
IMAGE below, but not grain, tensorflow-datasets, array_record, ml_collections, tensorboardX, nibabel and some of
their dependencies. This starts from the lines of requirements.txt whose package the image lacks (at their pinned
versions) and UNDECLARED, reads each downloaded wheel's METADATA `Requires-Dist` (markers evaluated for CPython
3.12 on Linux x86_64, extras followed) and fetches every requirement the image lacks in turn: at the version
requirements.txt pins, else the one installed here (the version the tests ran with), else the newest pip finds.
One version of each is kept in --out (older files there are removed: two versions stop the install). Prints the
set and its total size. launch/gpu_study.sh installs the folder with `pip install --no-index --no-deps --target`.
"""
import argparse
import os
import subprocess
import sys
from importlib import metadata

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU image's Python packages as the device notes list them (KINDS.md, read on 2026-11-17).
IMAGE = frozenset(
    canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())

# Imported at run time although no METADATA asks for it on Python 3.12: tensorflow_datasets' dataset_builder.py
# imports importlib_resources whenever it prepares a data set (its Requires-Dist limits it to Python < 3.9).
# tests/test_gpu_study.py finds such gaps: it reads data with nothing but the image's packages and these wheels.
UNDECLARED = ("importlib_resources",)

PYTHON = "3.12"
# Marker values of the GPU machine's interpreter (Python 3.12.3, CPython, Linux x86_64).
ENV = {
    "python_version": PYTHON, "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"
}
# pip matches manylinux_2_N tags exactly; the image's glibc (Ubuntu 24.04, 2.39) runs all of these.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def pins(path: str) -> dict[str, str]:
  """{canonical name: version} of requirements.txt's `name==version` lines."""
  out = {}
  with open(path) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if "==" in line:
        req = Requirement(line)
        out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
  return out


def needed(requires: list[str], extras: set[str]) -> list[Requirement]:
  """The `Requires-Dist` lines that apply on the GPU machine with `extras` asked for."""
  out = []
  for line in requires:
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in extras | {""}):
      out.append(req)
  return out


def wheel_requires(path: str) -> list[str]:
  import zipfile
  with zipfile.ZipFile(path) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
    text = z.read(name).decode()
  head = text.split("\n\n", 1)[0]  # the headers; the long description follows the first blank line
  return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


def installed_version(name: str):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def download(req: str, out: str) -> str:
  """pip-downloads one wheel for the GPU machine; -> its path."""
  cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
         "--implementation", "cp", "-d", out, req]
  for p in PLATFORMS:
    cmd[-1:-1] = ["--platform", p]
  before = set(os.listdir(out))
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    # Some pure-Python packages (promise) publish only a source archive: build their wheel here, and keep it only
    # if it is pure Python (a compiled one built here would be for this machine's Python).
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, req],
                           capture_output=True, text=True)
    if built.returncode:
      last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
      raise SystemExit(f"error: pip download {req}: {last}")
  name = canonicalize_name(Requirement(req).name)
  new = [f for f in os.listdir(out) if f.endswith(".whl") and canonicalize_name(parse_wheel_filename(f)[0]) == name]
  if r.returncode and not all(t.abi == "none" and t.platform == "any" for f in new for t in parse_wheel_filename(f)[3]):
    raise SystemExit(f"error: {req}: no wheel for Python {PYTHON} on PyPI, and the one built here is not pure Python")
  version = str(next(iter(Requirement(req).specifier)).version) if "==" in req else None
  match = [f for f in new if version is None or str(parse_wheel_filename(f)[1]) == version]
  fresh = [f for f in match if f not in before]
  if not (fresh or match):
    raise SystemExit(f"error: pip download {req}: no wheel for {name} in {out}")
  return os.path.join(out, (fresh or match)[0])


def resolve(out: str, requirements: str, log=print) -> dict[str, str]:
  """{canonical name: wheel path} of every package the image lacks that the project needs."""
  pinned = pins(requirements)
  queue = [(Requirement(f"{n}=={v}"), set()) for n, v in pinned.items() if n not in IMAGE]
  queue += [(Requirement(n), set()) for n in UNDECLARED]
  got, extras_seen = {}, {}
  while queue:
    req, extras = queue.pop(0)
    name = canonicalize_name(req.name)
    extras = extras | set(req.extras)
    if name in IMAGE:
      # On the image already; an extra asked of it may still need packages the image lacks (read from here).
      if extras - extras_seen.get(name, set()):
        local = (metadata.requires(req.name) or []) if installed_version(req.name) else []
        base = {str(r) for r in needed(local, set())}
        queue += [(r, set()) for r in needed(local, extras) if str(r) not in base]
      extras_seen[name] = extras_seen.get(name, set()) | extras
      continue
    if name in got:
      version = parse_wheel_filename(os.path.basename(got[name]))[1]
      if not req.specifier.contains(version, prereleases=True):
        raise SystemExit(f"error: {req} is needed but {name} {version} was chosen ({os.path.basename(got[name])})")
      if not extras - extras_seen[name]:
        continue
    else:
      version = pinned.get(name) or installed_version(req.name)
      if version and not req.specifier.contains(version, prereleases=True):
        version = None  # what is here does not fit: let pip pick within the specifier
      got[name] = download(f"{req.name}=={version}" if version else f"{req.name}{req.specifier}", out)
      log(f"  {os.path.basename(got[name])}  (for {req})")
    extras_seen[name] = extras_seen.get(name, set()) | extras
    queue += [(r, set()) for r in needed(wheel_requires(got[name]), extras)]
  return got


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, ".whl"), help="Folder for the wheels (ignored by git).")
  p.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  got = resolve(a.out, a.requirements)
  keep = {os.path.basename(w) for w in got.values()}
  for f in sorted(os.listdir(a.out)):
    if f.endswith(".whl") and f not in keep:  # another version of a package, or one no longer needed
      os.remove(os.path.join(a.out, f))
      print(f"  removed {f}")
  total = sum(os.path.getsize(w) for w in got.values())
  print(f"{len(got)} wheels, {total / 1e6:.1f} MB in {a.out}: {', '.join(sorted(got))}")


if __name__ == "__main__":
  main()
