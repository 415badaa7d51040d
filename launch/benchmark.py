"""Throughput of the real train steps and of the grain input pipelines on this machine.

    python launch/benchmark.py --what=step       # U-Net fine-tuning and SimCLR pre-training steps
    python launch/benchmark.py --what=pipeline   # BUSI and the multi-organ mix from ../shared/data
    python launch/benchmark.py --what=conv       # each convolution of both networks, per pass and lowering
    python launch/benchmark.py --what=feed       # the SimCLR step fed by the grain pre-training pipeline
    python launch/benchmark.py --what=all --res=128 --batch=16 --steps=10
    # GPU (README "Benchmarks"): SimCLR ResNet-50, 224 px, bf16, 256 images = 512 views per step
    python launch/benchmark.py --what=step,feed --cases=simclr --encoder=resnet50 --res=224 --dtype=bfloat16 \
        --batch=256 --workers=4,12 --warmup=3

Prints a table and one JSON line per case. Step cases run `usjax.train`'s own jitted step on random data of the
real shapes; each is timed twice: `+aug` is the real step (on-device augmentation included) and `noaug` is the
same step fed the images directly, the like-for-like number for a framework benchmark that does no augmentation.
Images/second count source images (a SimCLR image is two views); warm-up and compilation are excluded.
GFLOP/s is the step's FLOPs (`usjax.flops.step_flops`: its matmuls and convolutions as they run, so CPU
Winograd convolutions count 2.25x fewer) over the mean step time, and MFU that over the chip's dense peak
(`--peak_tflops`, else the bf16 peak of a known accelerator; accelerators run the model's direct convolutions).
`feed` times the grain pipeline alone (the host's ceiling), then the real SimCLR step on its batches: dispatch
is asynchronous, so the host prepares batch k+1 while the accelerator runs step k, and the step keeps its rate
only if the pipeline keeps up.
"""
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs` and `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_list(
    "what", "all", "Benchmarks to run, of step, pipeline, feed, conv; all = step + pipeline "
    "(conv is a CPU diagnostic).")
flags.DEFINE_integer("res", 128, "Image side in pixels (step cases).")
flags.DEFINE_integer("batch", 16, "Source images per step (SimCLR sees twice as many views).")
flags.DEFINE_integer("steps", 10, "Timed steps (or pipeline batches) per case, after warm-up.")
flags.DEFINE_integer(
    "warmup", 6, "Untimed steps per case after compilation (pipeline: untimed batches, plus 2 "
    "per worker). On CPU the kept host heap still grows (page faults, see faults_per_step) for "
    "the first 5 or so steps of a process.")
flags.DEFINE_string("encoder", "resnet18", "model.encoder")
flags.DEFINE_list(
    "dtype", "float32", "model.dtype (float32, bfloat16, auto). Several (float32,bfloat16): each step case "
    "compiles one step per dtype and times them alternately, one step each in turn, so that a shared machine "
    "slows all alike; the conv table runs once per dtype.")
flags.DEFINE_enum(
    "conv_impl", "auto", ["auto", "xla", "cpu"], "model.conv_impl: the convolutions' and stem pool's "
    "lowerings (auto = usjax.cpu_ops on CPU, XLA's elsewhere).")
flags.DEFINE_list("cases", "unet,simclr", "Step cases: unet (fine-tuning), simclr (pre-training).")
flags.DEFINE_list("variants", "aug,noaug", "Step variants: aug (the real step), noaug (no augmentation).")
flags.DEFINE_string("data_root", os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    "Folder with busi/, pocus/ and cifar10_test/.")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "usjax_bench_data"),
                    "Where the prepared data sets are written and reused.")
flags.DEFINE_list("sizes", "128,256", "Pipeline image sizes.")
flags.DEFINE_list("workers", "0,2", "data.num_workers values (pipeline and feed).")
flags.DEFINE_string("feed_sources", "synthetic_breast,synthetic_lung,synthetic_heart",
                    "data.pretrain_sources of the feed benchmark (busi, pocus, natural read --data_root).")
flags.DEFINE_integer("feed_steps", 100, "Timed batches and fed steps per feed case (many more than the "
                     "pipeline's buffers hold).")
flags.DEFINE_integer("synthetic_size", 256, "data.synthetic_size of the feed benchmark (stored image side).")
flags.DEFINE_integer("synthetic_num_images", 600, "data.synthetic_num_images of the feed benchmark.")
flags.DEFINE_float("peak_tflops", 0.0, "Dense peak of one device for MFU (0 = the bf16 peak of a known chip).")
FLAGS = flags.FLAGS


def base_config(case: str = "unet", dtype: str | None = None):
  """configs/finetune_busi.py's U-Net, or (case simclr) configs/pretrain_multiorgan.py's SimCLR with a
  512-512-128 projection head, at the flags' encoder, dtype (the first of --dtype unless given), conv_impl,
  batch and size."""
  from configs import default
  cfg = default.get_config()
  cfg.model.encoder, cfg.model.dtype, cfg.batch_size = FLAGS.encoder, dtype or FLAGS.dtype[0], FLAGS.batch
  cfg.model.conv_impl = FLAGS.conv_impl
  cfg.data.image_size = FLAGS.res
  if case == "simclr":
    cfg.method, cfg.model.proj_dims = "simclr", (512, 128)
  return cfg


# Dense bf16 peak TFLOP/s per chip, by device_kind substring (first match wins); MFU is reported against it.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v6", 918.0))


def peak_flops(dtype: str) -> float:
  """One device's dense peak in FLOP/s, or 0 where unknown (CPUs, fp32 on an accelerator)."""
  import jax
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops * 1e12
  if dtype == "float32" or jax.default_backend() == "cpu":
    return 0.0
  kind = jax.devices()[0].device_kind
  return next((t * 1e12 for name, t in PEAK_BF16_TFLOPS if name in kind), 0.0)


def rates(flops: float, mean_s: float, n_images: int, views: int, dtype: str) -> dict:
  """Throughput of a step of `flops` (`flops.step_flops`) in `mean_s` seconds: images and views per second,
  achieved GFLOP/s and MFU."""
  import jax
  peak = peak_flops(dtype)
  out = {
      "img_s": n_images / mean_s, "views_s": views * n_images / mean_s, "step_ms": 1e3 * mean_s,
      "gflop_per_step": flops / 1e9, "gflop_s": flops / mean_s / 1e9
  }
  if peak:  # the step runs on all devices: compare with all their peaks
    out["mfu_pct"] = 100 * flops / mean_s / (peak * jax.device_count())
  return out


def compile_timed(step_fn, state, batch):
  """(the compiled step, seconds its compilation took, its FLOPs)."""
  from usjax import flops
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0, flops.step_flops(step_fn, state, batch)


# A step that page-faults more than this (40 MB) re-touched memory the kernel took back: on the development VM a
# step now and then re-faults the whole heap though the process unmaps nothing (docs/performance.md).
# `fault_storm_steps` counts them; `median_step_ms` is the step time they do not move.
STORM_FAULTS = 10_000


def time_steps(runs: dict, n_images: int, views: int = 1) -> dict:
  """{dtype: result} for `runs` {dtype: (step_fn, state, batch)}: each compiled once (timed) and warmed up by
  `warmup` untimed steps, then `steps` rounds that run one step of each in turn. With several dtypes, each after
  the first gets `speedup`: the median over rounds of the first's step time over its own."""
  import jax
  compiled, states, metrics, times, faults, cpu, sys_s = {}, {}, {}, {}, {}, {}, {}
  for dtype, (step_fn, state, batch) in runs.items():
    compiled[dtype] = compile_timed(step_fn, state, batch)
    for _ in range(FLAGS.warmup):
      state, _ = compiled[dtype][0](state, batch)
    states[dtype] = jax.block_until_ready(state)
    times[dtype], faults[dtype], cpu[dtype], sys_s[dtype] = [], [], 0.0, 0.0
  for _ in range(FLAGS.steps):
    for dtype, (_, _, batch) in runs.items():
      u0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      states[dtype], metrics[dtype] = compiled[dtype][0](states[dtype], batch)
      jax.block_until_ready((states[dtype], metrics[dtype]))
      times[dtype].append(time.perf_counter() - t)
      u = resource.getrusage(resource.RUSAGE_SELF)
      faults[dtype].append(u.ru_minflt - u0.ru_minflt)
      cpu[dtype] += (u.ru_utime - u0.ru_utime) + (u.ru_stime - u0.ru_stime)
      sys_s[dtype] += u.ru_stime - u0.ru_stime
  first, out = next(iter(times)), {}
  for dtype, ts in times.items():
    _, compile_s, flops = compiled[dtype]
    out[dtype] = {
        **rates(flops, sum(ts) / len(ts), n_images, views, dtype), "min_step_ms": 1e3 * min(ts),
        "median_step_ms": 1e3 * statistics.median(ts), "compile_s": compile_s, "loss": float(metrics[dtype]["loss"]),
        "cores_busy": cpu[dtype] / sum(ts), "sys_frac": sys_s[dtype] / max(cpu[dtype], 1e-9),
        "faults_per_step": sum(faults[dtype]) / FLAGS.steps,
        "fault_storm_steps": sum(n > STORM_FAULTS for n in faults[dtype])
    }
    if dtype != first:
      out[dtype]["speedup"] = statistics.median(a / b for a, b in zip(times[first], ts))
  return out


def noaug_pretrain_loss(params, batch_stats, extra, images, key, step, *, method):
  """`pretrain.pretrain_loss` with the batch's two halves as the two views (no augmentation)."""
  from usjax import train
  x = train.to_float(images)
  n = x.shape[0] // 2
  return method.loss(params, batch_stats, extra, x[:n], x[n:], step)


def noaug_segmentation_loss(params, batch_stats, extra, batch, key, step, *, model):
  """`finetune.segmentation_loss` without the augmentation."""
  import jax.numpy as jnp
  from usjax import objectives, train
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, train.to_float(batch[0]), train=True,
                                 mutable=["batch_stats"])
  return objectives.dice_bce(logits, batch[1].astype(jnp.float32)), (new_vars["batch_stats"], extra, {})


def step_losses(case: str, dtype: str, images, masks, views):
  """(model, optimizer, after_step, {variant: (loss_fn, local batch)}) of a step case at `dtype`."""
  from usjax import augment, finetune, methods, pretrain, train
  cfg = base_config(case, dtype)
  tx = train.make_optimizer(cfg, 1000)
  if case == "unet":  # configs/finetune_busi.py: segmentation augmentation recipe, Dice + BCE, adamw
    model = train.build_model(cfg)
    real = functools.partial(finetune.segmentation_loss, model=model, aug_cfg=augment.AugmentConfig.segmentation())
    bare = functools.partial(noaug_segmentation_loss, model=model)
    return model, tx, None, {"+aug": (real, (images, masks)), "noaug": (bare, (images, masks))}
  # SimCLR, NT-Xent
  method = methods.make_method(cfg)
  real = functools.partial(pretrain.pretrain_loss, method=method,
                           aug_cfg=augment.AugmentConfig.from_dict(cfg.augment))
  bare = functools.partial(noaug_pretrain_loss, method=method)
  return method.model, tx, method.after_step, {"+aug": (real, images), "noaug": (bare, views)}


def step_cases():
  """Yields (name, result) for each step case, with and without augmentation, and each of --dtype."""
  import numpy as np
  from usjax import train
  mesh = train.make_mesh()
  rng = np.random.default_rng(0)
  s, b = FLAGS.res, FLAGS.batch
  images = rng.integers(0, 256, (b, s, s, 1), np.uint8)
  masks = (rng.random((b, s, s, 1)) > 0.7).astype(np.uint8)
  views = rng.integers(0, 256, (2 * b, s, s, 1), np.uint8)
  for case in FLAGS.cases:
    for variant in ("+aug", "noaug"):
      if variant.lstrip("+") not in FLAGS.variants:
        continue
      runs = {}
      for dtype in FLAGS.dtype:
        model, tx, after_step, losses = step_losses(case, dtype, images, masks, views)
        loss_fn, local = losses[variant]
        runs[dtype] = (train.compile_step(loss_fn, tx, mesh, after_step),
                       train.init_state(model, tx, 0, (2, s, s, 1), mesh), train.global_batch(local, mesh))
      for dtype, res in time_steps(runs, b, views=2 if case == "simclr" else 1).items():
        yield f"{case} {variant}" + (f" {dtype}" if len(FLAGS.dtype) > 1 else ""), {**res, "dtype": dtype}


def conv_shapes(case: str) -> dict:
  """{(x shape, kernel shape, stride): count} of the convolutions `case`'s network runs, recorded by tracing it."""
  import collections
  import jax
  from usjax import cpu_ops, methods, train
  seen, original = collections.Counter(), cpu_ops.cpu_conv_paths

  def record(x_shape, kernel_shape, stride, dtype):
    seen[(tuple(x_shape), tuple(kernel_shape), stride)] += 1
    return original(x_shape, kernel_shape, stride, dtype)

  cfg = base_config(case)
  cfg.model.conv_impl = "cpu"  # the shapes are those `cpu_conv` chooses a lowering for
  n = FLAGS.batch
  if case == "simclr":
    model, n = methods.make_method(cfg).model, 2 * FLAGS.batch
  else:
    model = train.build_model(cfg)
  cpu_ops.cpu_conv_paths = record
  try:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((n, FLAGS.res, FLAGS.res, 1))))
  finally:
    cpu_ops.cpu_conv_paths = original
  return dict(seen)


def conv_cases():
  """Yields (name, result) per convolution and dtype: milliseconds per pass (fwd, dx, dw) of each lowering, and
  of the chosen one. All lowerings and dtypes of a convolution are timed in turn, one call each per round (the
  median of `steps` rounds), so that a shared machine slows all alike."""
  import jax
  from usjax import cpu_ops, precision, winograd
  dtypes = {name: precision.compute_dtype(name) for name in FLAGS.dtype}

  for case in FLAGS.cases:
    for (xs, ks, stride), count in conv_shapes(case).items():
      kx, kk, kd = jax.random.split(jax.random.key(0), 3)
      x, k = jax.random.normal(kx, xs), jax.random.normal(kk, ks)
      dy = jax.random.normal(kd, jax.eval_shape(lambda x, k: cpu_ops.lax_conv(x, k, stride), x, k).shape)
      fns = {}  # (dtype name, column): (jitted pass, its arguments)
      paths = ("lax", "matmul") + (("winograd",) if winograd.fits(xs, ks, stride) else ())
      for name, dt in dtypes.items():  # f32 arrays, as the models give them; `dt` is the matmul operand dtype
        for path in paths:
          fns[name, f"fwd_{path}"] = lambda x, k, dy, p=path, dt=dt: cpu_ops.conv_by(p)(x, k, stride, dt)
          if ks[2] > 1:  # the stem's input needs no gradient
            fns[name, f"dx_{path}"] = lambda x, k, dy, p=path, dt=dt: cpu_ops.conv_input_grad(p, dy, x, k, stride, dt)
        for path in paths + ("taps",):
          fns[name, f"dw_{path}"] = lambda x, k, dy, p=path, dt=dt: cpu_ops.conv_weight_grad(p, dy, x, k, stride, dt)
      fns = {key: jax.jit(fn) for key, fn in fns.items()}
      times = {key: [] for key in fns}
      for fn in fns.values():
        jax.block_until_ready(fn(x, k, dy))
      for _ in range(FLAGS.steps):
        for key, fn in fns.items():
          t = time.perf_counter()
          jax.block_until_ready(fn(x, k, dy))
          times[key].append(time.perf_counter() - t)
      ms = {key: 1e3 * statistics.median(ts) for key, ts in times.items()}
      names = {jax.numpy.dtype(dt): name for name, dt in dtypes.items()}
      for name, dt in dtypes.items():
        res = {"count": count, "dtype": name}
        res.update({col: v for (n, col), v in ms.items() if n == name})
        chosen = cpu_ops.cpu_conv_paths(xs, ks, stride, dt)
        # a pass that keeps f32 operands (`cpu_conv_dtypes`) is timed in the f32 row, where there is one
        pass_names = [names.get(d, name) for d in cpu_ops.cpu_conv_dtypes(xs, ks, stride, dt)]
        res["chosen"] = sum(
            ms.get((n, f"{p}_{c}"), 0.0) for p, c, n in zip(("fwd", "dx", "dw"), chosen, pass_names))
        res["best"] = sum(
            min((v for key, v in res.items() if key.startswith(p + "_")), default=0.0) for p in ("fwd", "dx", "dw"))
        yield (f"conv {case} {xs[1]}x{xs[2]} {ks[2]}->{ks[3]} k{ks[0]} s{stride} x{count} {jax.numpy.dtype(dt).name} "
               f"[{'/'.join(chosen)}]"), res


def with_data(cfg, size: int, workers: int):
  """`cfg` reading the real sets under --data_root (and the synthetic ones) at `size` px with `workers`."""
  root, d = FLAGS.data_root, cfg.data
  d.data_dir, d.image_size, d.num_workers = FLAGS.data_dir, size, workers
  d.busi_dir, d.pocus_dir = os.path.join(root, "busi"), os.path.join(root, "pocus")
  d.natural_dir = os.path.join(root, "cifar10_test")
  d.synthetic_size, d.synthetic_num_images = FLAGS.synthetic_size, FLAGS.synthetic_num_images
  return cfg


def time_batches(it, workers: int, n: int) -> tuple[float, float]:
  """(seconds to the first batches, batches/second over the next `n`) of a pipeline iterator `it`.

  The first batches include those the worker processes prefetched while starting (about two per worker), so
  the timed ones measure how fast the pipeline makes batches, not how fast its buffers empty."""
  t0 = time.perf_counter()
  for _ in range(max(FLAGS.warmup, 1) + 2 * workers):
    next(it)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  return first_s, n / (time.perf_counter() - t0)


def pipeline_cases():
  """Yields (name, result) for BUSI fine-tuning batches and the busi+pocus+natural pre-training mix."""
  from usjax.data import pipeline
  if not os.path.isdir(os.path.join(FLAGS.data_root, "busi")):
    print(f"pipeline: skipped, no data at {FLAGS.data_root}")
    return
  for size in map(int, FLAGS.sizes):
    for workers in map(int, FLAGS.workers):
      d = with_data(base_config(), size, workers).data
      d.finetune_source, d.pretrain_sources = "busi", "busi,pocus,natural"
      for name, make in (("busi", lambda: pipeline.finetune_dataset(d, FLAGS.batch, 0)[0]),
                         ("multiorgan", lambda: pipeline.pretrain_dataset(d, FLAGS.batch, 0))):
        it = iter(make())
        first_s, batches_s = time_batches(it, workers, FLAGS.steps)
        del it
        yield f"pipeline {name} {size}px w{workers}", {"img_s": FLAGS.batch * batches_s, "startup_s": first_s}


def feed_cases():
  """Yields (name, result) per worker count: the pre-training pipeline alone, then the SimCLR step fed by it."""
  import jax
  import numpy as np
  from usjax import augment, methods, pretrain, train
  from usjax.data import pipeline
  mesh, s, b = train.make_mesh(), FLAGS.res, FLAGS.batch
  cfg = base_config("simclr")
  method, tx = methods.make_method(cfg), train.make_optimizer(cfg, 1000)
  loss_fn = functools.partial(pretrain.pretrain_loss, method=method,
                              aug_cfg=augment.AugmentConfig.from_dict(cfg.augment))
  step_fn = train.compile_step(loss_fn, tx, mesh, method.after_step)
  state = train.init_state(method.model, tx, 0, (2, s, s, 1), mesh)
  zeros = train.global_batch(np.zeros((b, s, s, 1), np.uint8), mesh)
  compiled, compile_s, flops = compile_timed(step_fn, state, zeros)
  for workers in map(int, FLAGS.workers):
    d = with_data(cfg, s, workers).data
    d.pretrain_sources = FLAGS.feed_sources
    it = iter(pipeline.pretrain_dataset(d, b, 0))
    n = FLAGS.feed_steps
    first_s, batches_s = time_batches(it, workers, n)  # the pipeline alone
    for _ in range(FLAGS.warmup):
      state, metrics = compiled(state, train.global_batch(next(it)["image"], mesh))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, train.global_batch(next(it)["image"], mesh))
    jax.block_until_ready((state, metrics))
    mean_s = (time.perf_counter() - t0) / n
    del it
    yield f"feed simclr {s}px w{workers}", {
        **rates(flops, mean_s, b, 2, FLAGS.dtype[0]), "compile_s": compile_s, "loss": float(metrics["loss"]),
        "pipe_img_s": b * batches_s, "startup_s": first_s
    }


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
  except OSError:
    return "unknown"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import report, runtime
  kept = runtime.keep_host_memory()  # before JAX's first computation, as launch/main.py does
  report.quiet_libraries()
  import jax
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s): "
      f"{jax.devices()[0].device_kind}; {os.cpu_count()} cpu(s): {cpu_model()}); "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; host heap kept: {kept}", flush=True)
  what = {"step", "pipeline"} if "all" in FLAGS.what else set(FLAGS.what)
  unknown = what - {"step", "pipeline", "feed", "conv"}
  if unknown:
    raise app.UsageError(f"--what: unknown {', '.join(sorted(unknown))}; use step, pipeline, feed, conv or all")
  gens = [
      make()
      for name, make in (("step", step_cases), ("conv", conv_cases), ("feed", feed_cases), ("pipeline", pipeline_cases))
      if name in what
  ]
  rows = []
  for gen in gens:
    for name, res in gen:
      rows.append((name, res))
      print(
          json.dumps({
              "case": name, "res": FLAGS.res, "batch": FLAGS.batch, "encoder": FLAGS.encoder,
              "dtype": FLAGS.dtype[0], "conv_impl": FLAGS.conv_impl,
              **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
          }), flush=True)
  throughput = [(n, r) for n, r in rows if "img_s" in r]
  rate_cols = (("img_s", "img/s", 9, 1), ("views_s", "views/s", 9, 1), ("pipe_img_s", "pipe img/s", 11, 1),
               ("step_ms", "step ms", 9, 1), ("compile_s", "compile s", 11, 1), ("gflop_s", "GFLOP/s", 10, 1),
               ("mfu_pct", "MFU %", 7, 1), ("cores_busy", "cores", 7, 2), ("speedup", "speedup", 9, 2))
  if throughput:
    print(f"\n{'case':<32}" + "".join(f"{title:>{w}}" for _, title, w, _ in rate_cols))
  for name, r in throughput:
    print(f"{name:<32}" + "".join(f"{r[k]:{w}.{d}f}" if k in r else " " * w for k, _, w, d in rate_cols))
  convs = [(n, r) for n, r in rows if "chosen" in r]
  if convs:
    cols = ("fwd_lax", "fwd_matmul", "fwd_winograd", "dx_lax", "dx_matmul", "dx_winograd", "dw_lax", "dw_matmul",
            "dw_taps", "dw_winograd", "chosen", "best")
    print(f"\n{'convolution (ms per call)':<62}" + "".join(f"{c:>11}" for c in cols))
    for name, r in convs:
      print(f"{name:<62}" + "".join(f"{r[c]:11.1f}" if c in r else " " * 11 for c in cols))
    for dtype in FLAGS.dtype:
      for key in ("chosen", "best"):
        total = sum(r[key] * r["count"] for _, r in convs if r["dtype"] == dtype)
        print(f"sum x count, {dtype}, {key}: {total:.0f} ms")


if __name__ == "__main__":
  app.run(main)
