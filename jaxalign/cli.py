"""The command line: `jaxalign train | evaluate | pipeline ...` (the console script the package installs), and
what the checkout's `launch/train.py` and `launch/pipeline.py` call.

  jaxalign train --config=sft --workdir=runs/sft --config.model.init=/models/Qwen3-0.6B
  jaxalign evaluate --config=evaluate --workdir=runs/eval --config.model.init=runs/dpo
  jaxalign pipeline --workdir=runs/quickstart

`--config` takes a stage name (`sft`, `dpo:tiny`: the file installed in `jaxalign.configs`) or a path to a
config file. Flags are defined when a command runs (absl flags are process-global, and each command has its
own `--config` default); user mistakes print one line (errors.run_main).
"""

from __future__ import annotations

import sys

from jaxalign import configs, errors

USAGE = "usage: jaxalign {train,evaluate,pipeline} --config=STAGE|FILE --workdir=DIR [--config.key=value ...]"


def _skip_absent_tpu() -> None:
  """With libtpu installed (the test extra brings it, for compile plans) but no TPU attached, jax would try the
  TPU backend first and libtpu would print its initialisation failures (TPU_ACCELERATOR_TYPE, worker
  hostnames, 'No jellyfish device found'): noise a newcomer reads as a bug. When JAX_PLATFORMS is unset and
  the machine has no TPU device files, pick the platforms explicitly: CUDA (if its jax plugin is installed)
  and the CPU. A TPU VM (/dev/accel*, /dev/vfio/N) and an explicit JAX_PLATFORMS are left alone."""
  import importlib.util
  import os

  from jaxalign import cpu_runtime

  if "JAX_PLATFORMS" in os.environ or cpu_runtime.tpu_attached():
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cpu_runtime.cuda_plugin_installed() else "cpu"


def _prepare_process() -> None:
  """What a launcher does before jax is imported: pick the platforms, then (on the CPU) relaunch once with the
  allocator XLA:CPU's steps run fastest under (cpu_runtime). Not for --dry_run: a plan only compiles, and
  the tuned allocator compiles slower."""
  _skip_absent_tpu()
  from jaxalign import cpu_runtime

  if any(a == "--dry_run" or (a.startswith("--dry_run=") and a.split("=", 1)[1].lower() not in ("false", "0"))
         for a in sys.argv[1:]):
    return
  cpu_runtime.relaunch()


def _resolve_config_arg(argv: list[str], default: str | None = None) -> list[str]:
  """`--config=sft` -> `--config=<installed sft.py>`; a path stays as given; a default when absent."""
  out, seen = [], False
  for a in argv:
    if a.startswith("--config="):
      seen = True
      a = "--config=" + configs.path(a.split("=", 1)[1])
    out.append(a)
  if not seen and default:
    out.insert(1, "--config=" + configs.path(default))
  return out


def train(argv: list[str] | None = None) -> None:
  """`launch/train.py`: one stage, or its compile plan with --dry_run. `argv=None`: this process's own command
  line (a launcher; it may relaunch itself, cpu_runtime); a list: called from Python, nothing relaunched."""
  _prepare_process() if argv is None else _skip_absent_tpu()
  from absl import app, flags, logging
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "Stage config: a stage name (sft, dpo:tiny) or a "
                                           "file (configs/<stage>.py[:variant]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, export/.")
  dist = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                           "jax.distributed: auto (TPU pods, SLURM), on (needs coordinator flags), off.")
  coord = flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit multi-process).")
  nproc = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
  pid = flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process).")
  dry = flags.DEFINE_bool("dry_run", False, "Compile the stage's steps from shapes alone; print per-device "
                          "memory, write WORKDIR/plan.json; no weight or data read.")
  topology = flags.DEFINE_string("topology", "", "With --dry_run: compile for a Cloud TPU slice (v4-8, v5e-16, "
                                 "v5p-128, v6e-64, ...) instead of the local devices (needs libtpu, not a TPU).")
  slices = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices (multislice).")
  step_time = flags.DEFINE_enum("step_time", "extrapolated", ["extrapolated", "unrolled", "none"],
                                "With --topology: price the step from 1- and 2-layer compiles (about 1%), "
                                "from the whole model unrolled (exact to the cost model; minutes), or not.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(args):
    del args
    from jaxalign import compile_cache, launch_utils

    if not dry.value:  # Before anything compiles: reruns and later stages load their programs.
      compile_cache.enable()
    launch_utils.init_distributed(dist.value, coord.value, nproc.value, pid.value)
    cfg = config.value
    launch_utils.log_devices()
    if dry.value:
      launch_utils.dry_run(cfg, workdir.value, topology.value, slices.value, step_time.value)
      return
    sys.exit(launch_utils.train(cfg, workdir.value))

  sys.argv = _resolve_config_arg(list(sys.argv if argv is None else argv))
  logging.set_verbosity(logging.INFO)
  errors.run_main(app.run, main)


def pipeline(argv: list[str] | None = None) -> None:
  """`launch/pipeline.py`: the quickstart, SFT -> reward model -> DPO, PPO, GRPO -> evaluation -> report
  (`argv` as for `train`)."""
  _prepare_process() if argv is None else _skip_absent_tpu()
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "Pipeline config (quickstart[:test], or a file).")
  workdir = flags.DEFINE_string("workdir", "runs/quickstart", "Directory for every stage's run and the report.")

  def main(args):
    del args
    from jaxalign import paths, quickstart

    if paths.is_remote(workdir.value):  # The laptop path: its built-in data and report are local files.
      raise errors.ConfigError(f"--workdir={workdir.value}: the pipeline keeps its workdir local; give a local "
                               "directory (for a bucket, run each stage with launch/train.py --workdir=gs://...)")
    quickstart.run(config.value, workdir.value)

  sys.argv = _resolve_config_arg(list(sys.argv if argv is None else argv), default="quickstart")
  errors.run_main(app.run, main)


def main() -> None:
  """The `jaxalign` console script: the first argument picks the command."""
  if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    print(__doc__.split("\n\n", 2)[1])
    sys.exit(0 if len(sys.argv) >= 2 else 2)
  _prepare_process()
  command, rest = sys.argv[1], sys.argv[2:]
  prog = f"jaxalign {command}"
  if command in ("train", "evaluate"):
    if command == "evaluate" and not any(a.startswith("--config=") for a in rest):
      rest = ["--config=evaluate", *rest]
    train([prog, *rest])
  elif command == "pipeline":
    pipeline([prog, *rest])
  else:
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


if __name__ == "__main__":
  main()
