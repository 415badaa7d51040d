"""Throughput of the real train steps and of the grain input pipelines on this machine.

    python launch/benchmark.py --what=step       # U-Net fine-tuning and SimCLR pre-training steps
    python launch/benchmark.py --what=pipeline   # BUSI and the multi-organ mix from ../shared/data
    python launch/benchmark.py --what=conv       # each convolution of both networks, per pass and lowering
    python launch/benchmark.py --what=all --res=128 --batch=16 --steps=10

Prints a table and one JSON line per case. Step cases run `usjax.train`'s own jitted step on random data of the
real shapes; each is timed twice: `+aug` is the real step (on-device augmentation included) and `noaug` is the
same step fed the images directly, the like-for-like number for a framework benchmark that does no augmentation.
Images/second count source images (a SimCLR image is two views); warm-up and compilation are excluded.
"""
import functools
import json
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs` and `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("what", "all", ["step", "pipeline", "conv", "all"],
                  "Which benchmark to run; all = step + pipeline (conv is a CPU diagnostic, run on its own).")
flags.DEFINE_integer("res", 128, "Image side in pixels (step cases).")
flags.DEFINE_integer("batch", 16, "Source images per step (SimCLR sees twice as many views).")
flags.DEFINE_integer("steps", 10, "Timed steps (or pipeline batches) per case, after warm-up.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per case after compilation.")
flags.DEFINE_string("encoder", "resnet18", "model.encoder")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model.dtype")
flags.DEFINE_list("cases", "unet,simclr", "Step cases: unet (fine-tuning), simclr (pre-training).")
flags.DEFINE_list("variants", "aug,noaug", "Step variants: aug (the real step), noaug (no augmentation).")
flags.DEFINE_string("data_root", os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    "Folder with busi/, pocus/ and cifar10_test/.")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "usjax_bench_data"),
                    "Where the prepared data sets are written and reused.")
flags.DEFINE_list("sizes", "128,256", "Pipeline image sizes.")
flags.DEFINE_list("workers", "0,2", "Pipeline data.num_workers values.")
FLAGS = flags.FLAGS


def base_config():
  from configs import default
  cfg = default.get_config()
  cfg.model.encoder, cfg.model.dtype, cfg.batch_size = FLAGS.encoder, FLAGS.dtype, FLAGS.batch
  cfg.data.image_size = FLAGS.res
  return cfg


def total_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  costs = cost if isinstance(cost, (list, tuple)) else [cost]
  return float(sum((c or {}).get("flops", 0.0) for c in costs))


def time_step(step_fn, state, batch, n_images: int) -> dict:
  """Compiles once (timed), runs `warmup` untimed steps, then `steps` timed ones."""
  import jax
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times, usage0 = [], resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(FLAGS.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  mean_s = sum(times) / len(times)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu_s = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
  flops = total_flops(compiled)
  return {"img_s": n_images / mean_s, "step_ms": 1e3 * mean_s, "min_step_ms": 1e3 * min(times),
          "compile_s": compile_s, "gflop_per_step": flops / 1e9, "gflop_s": flops / mean_s / 1e9,
          "loss": float(metrics["loss"]),
          "cores_busy": cpu_s / sum(times), "sys_frac": (usage.ru_stime - usage0.ru_stime) / max(cpu_s, 1e-9),
          "faults_per_step": (usage.ru_minflt - usage0.ru_minflt) / FLAGS.steps}


def noaug_pretrain_loss(params, batch_stats, extra, images, key, step, *, method):
  """`train.pretrain_loss` with the batch's two halves as the two views (no augmentation)."""
  from usjax import train
  x = train.to_float(images)
  n = x.shape[0] // 2
  return method.loss(params, batch_stats, extra, x[:n], x[n:], step)


def noaug_segmentation_loss(params, batch_stats, extra, batch, key, step, *, model):
  """`train.segmentation_loss` without the augmentation."""
  import jax.numpy as jnp
  from usjax import objectives, train
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, train.to_float(batch[0]),
                                 train=True, mutable=["batch_stats"])
  return objectives.dice_bce(logits, batch[1].astype(jnp.float32)), (new_vars["batch_stats"], extra, {})


def step_cases():
  """Yields (name, result) for each step case, with and without augmentation."""
  import numpy as np
  from usjax import augment, methods, train
  mesh = train.make_mesh()
  rng = np.random.default_rng(0)
  s, b = FLAGS.res, FLAGS.batch
  images = rng.integers(0, 256, (b, s, s, 1), np.uint8)
  for case in FLAGS.cases:
    cfg = base_config()
    tx, after_step = train.make_optimizer(cfg, 1000), None
    if case == "unet":   # configs/finetune_busi.py: segmentation augmentation recipe, Dice + BCE, adamw
      model = train.build_model(cfg)
      aug_cfg = augment.AugmentConfig.segmentation()
      real = functools.partial(train.segmentation_loss, model=model, aug_cfg=aug_cfg)
      bare = functools.partial(noaug_segmentation_loss, model=model)
      pair = (images, (rng.random((b, s, s, 1)) > 0.7).astype(np.uint8))
      local = {"+aug": pair, "noaug": pair}
    else:   # configs/pretrain_multiorgan.py: SimCLR, 512-512-128 projection head, NT-Xent
      cfg.method, cfg.model.proj_dims = "simclr", (512, 128)
      method = methods.make_method(cfg)
      model, after_step = method.model, method.after_step
      real = functools.partial(train.pretrain_loss, method=method, aug_cfg=augment.AugmentConfig.from_dict(cfg.augment))
      bare = functools.partial(noaug_pretrain_loss, method=method)
      local = {"+aug": images, "noaug": rng.integers(0, 256, (2 * b, s, s, 1), np.uint8)}
    for variant, loss_fn in (("+aug", real), ("noaug", bare)):
      if variant.lstrip("+") not in FLAGS.variants:
        continue
      state = train.init_state(model, tx, 0, (2, s, s, 1), mesh)
      step_fn = train.compile_step(loss_fn, tx, mesh, after_step)
      yield f"{case} {variant}", time_step(step_fn, state, train.global_batch(local[variant], mesh), b)


def conv_shapes(case: str) -> dict:
  """{(x shape, kernel shape, stride): count} of the convolutions `case`'s network runs, recorded by tracing it."""
  import collections
  import jax
  from usjax import methods, models, train
  seen, original = collections.Counter(), models.cpu_conv_paths
  def record(x_shape, kernel_shape, stride):
    seen[(tuple(x_shape), tuple(kernel_shape), stride)] += 1
    return original(x_shape, kernel_shape, stride)
  cfg = base_config()
  n = FLAGS.batch
  if case == "simclr":
    cfg.method, cfg.model.proj_dims = "simclr", (512, 128)
    model, n = methods.make_method(cfg).model, 2 * FLAGS.batch
  else:
    model = train.build_model(cfg)
  models.cpu_conv_paths = record
  try:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((n, FLAGS.res, FLAGS.res, 1))))
  finally:
    models.cpu_conv_paths = original
  return dict(seen)


def conv_cases():
  """Yields (name, result): milliseconds per pass (fwd, dx, dw) of each lowering, and of the chosen one."""
  import jax
  from usjax import models
  def ms(fn, *args):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = fn(*args)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t) / FLAGS.steps
  lowerings = {"lax": models.lax_conv, "matmul": models.conv_as_matmul}
  for case in FLAGS.cases:
    for (xs, ks, stride), count in conv_shapes(case).items():
      kx, kk, kd = jax.random.split(jax.random.key(0), 3)
      x, k = jax.random.normal(kx, xs), jax.random.normal(kk, ks)
      dy = jax.random.normal(kd, jax.eval_shape(lambda x, k: models.lax_conv(x, k, stride), x, k).shape)
      res = {"count": count}
      for name, conv in lowerings.items():
        res[f"fwd_{name}"] = ms(lambda x, k: conv(x, k, stride), x, k)
        if ks[2] > 1:   # the stem's input needs no gradient
          res[f"dx_{name}"] = ms(lambda x, k, dy: jax.vjp(lambda x: conv(x, k, stride), x)[1](dy)[0], x, k, dy)
        res[f"dw_{name}"] = ms(lambda x, k, dy: jax.vjp(lambda k: conv(x, k, stride), k)[1](dy)[0], x, k, dy)
      res["dw_taps"] = ms(lambda x, dy: models.conv_weight_grad_by_taps(x, dy, ks, stride), x, dy)
      chosen = models.cpu_conv_paths(xs, ks, stride)
      res["chosen"] = sum(res.get(f"{p}_{c}", 0.0) for p, c in zip(("fwd", "dx", "dw"), chosen))
      res["best"] = sum(min((v for key, v in res.items() if key.startswith(p + "_")), default=0.0)
                        for p in ("fwd", "dx", "dw"))
      yield f"conv {case} {xs[1]}x{xs[2]} {ks[2]}->{ks[3]} k{ks[0]} s{stride} x{count} [{'/'.join(chosen)}]", res


def pipeline_cases():
  """Yields (name, result) for BUSI fine-tuning batches and the busi+pocus+natural pre-training mix."""
  from usjax.data import pipeline
  root = FLAGS.data_root
  if not os.path.isdir(os.path.join(root, "busi")):
    print(f"pipeline: skipped, no data at {root}")
    return
  for size in map(int, FLAGS.sizes):
    for workers in map(int, FLAGS.workers):
      cfg = base_config()
      d = cfg.data
      d.data_dir, d.image_size, d.num_workers = FLAGS.data_dir, size, workers
      d.busi_dir, d.pocus_dir = os.path.join(root, "busi"), os.path.join(root, "pocus")
      d.natural_dir = os.path.join(root, "cifar10_test")
      d.source, d.sources = "busi", "busi,pocus,natural"
      for name, make in (("busi", lambda: pipeline.finetune_dataset(d, FLAGS.batch, 0)[0]),
                         ("multiorgan", lambda: pipeline.pretrain_dataset(d, FLAGS.batch, 0))):
        it = iter(make())
        t0 = time.perf_counter()
        for _ in range(max(FLAGS.warmup, 1)):
          next(it)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
          next(it)
        dt = time.perf_counter() - t0
        del it
        yield f"pipeline {name} {size}px w{workers}", {"img_s": FLAGS.batch * FLAGS.steps / dt,
                                                       "startup_s": first_s}


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
  kept = runtime.keep_host_memory()   # before JAX's first computation, as launch/main.py does
  report.quiet_libraries()
  import jax
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}; {os.cpu_count()} cpu(s): {cpu_model()}); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; host heap kept: {kept}", flush=True)
  gens = ([step_cases()] if FLAGS.what in ("step", "all") else []) + \
         ([conv_cases()] if FLAGS.what == "conv" else []) + \
         ([pipeline_cases()] if FLAGS.what in ("pipeline", "all") else [])
  rows = []
  for gen in gens:
    for name, res in gen:
      rows.append((name, res))
      print(json.dumps({"case": name, "res": FLAGS.res, "batch": FLAGS.batch, "encoder": FLAGS.encoder,
                        "dtype": FLAGS.dtype, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
  throughput = [(n, r) for n, r in rows if "img_s" in r]
  if throughput:
    print(f"\n{'case':<32}{'img/s':>9}{'step ms':>9}{'compile s':>11}{'GFLOP/s':>9}{'cores':>7}")
  for name, r in throughput:
    cells = [f"{r['img_s']:9.1f}"] + [f"{r[k]:{w}.{d}f}" if k in r else " " * w for k, w, d in
                                      (("step_ms", 9, 1), ("compile_s", 11, 1), ("gflop_s", 9, 1), ("cores_busy", 7, 2))]
    print(f"{name:<32}{''.join(cells)}")
  convs = [(n, r) for n, r in rows if "chosen" in r]
  if convs:
    cols = ("fwd_lax", "fwd_matmul", "dx_lax", "dx_matmul", "dw_lax", "dw_matmul", "dw_taps", "chosen", "best")
    print(f"\n{'convolution (ms per call)':<52}" + "".join(f"{c:>11}" for c in cols))
    for name, r in convs:
      print(f"{name:<52}" + "".join(f"{r[c]:11.1f}" if c in r else " " * 11 for c in cols))
    for key in ("chosen", "best"):
      print(f"sum x count, {key}: {sum(r[key] * r['count'] for _, r in convs):.0f} ms")


if __name__ == "__main__":
  app.run(main)
