"""THE loop: every stage (SFT, reward, DPO, PPO, GRPO) is a `Parts` built by its module and run here.

`run` owns what a training run needs around its step: exact resume (state, data position and RNG), SIGTERM
(preemption: save, then stop cleanly), the NaN/spike policy, checkpoint cadence with best-metric keeping and
early stopping, eval cadence, metrics read one step late (the accelerator is never waiting on the host),
progress with ETA, metrics rows and the export. A step is any callable `step(state, batch) -> (state,
metrics)` on device arrays: a jitted offline step, a jitted PPO iteration, or GRPO's jitted rollout + host
reward + jitted update.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
from typing import Any, Callable

import jax
import numpy as np

from jaxalign import checkpoint, compile_cache, paths, sharding
from jaxalign.checkpoint import Checkpointer, abstract_like
from jaxalign.errors import ConfigError
from jaxalign.metrics import MetricWriter, Throughput, fetch
from jaxalign.steps.state import TrainState, checkpoint_items, from_items


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under train.nan_policy=stop."""


class Preempted(Exception):
  """SIGTERM received: the loop saved a checkpoint and stopped."""


class CheckpointLayoutError(ValueError):
  """The workdir's checkpoint was written by another layout of the state than this version's."""


@dataclasses.dataclass
class Parts:
  """What a stage's `build` returns. In a compile plan (`abstract=True`) `state` holds ShapeDtypeStructs with
  shardings, `batches` is None, and `programs` name each jitted function with abstract arguments."""

  name: str
  state: TrainState
  step: Callable  # (state, device batch) -> (state, device metrics); jitted with shardings and donation.
  batches: Any  # Host batches: next(), state(), restore(); None in a plan.
  mesh: Any
  evaluate: Callable | None = None  # (state, step, final: bool) -> host metrics.
  export: Callable | None = None  # (state) -> None: the end-of-run export (HF checkpoint).
  baseline_eval: bool = False  # Evaluate the starting state at step 0 (online RL: every later eval reads against it).
  programs: dict = dataclasses.field(default_factory=dict)  # name -> (jitted fn, abstract args): the plan's input.
  compiles: Callable[[], int] | None = None  # Compilations so far (the summary row; tests assert 'once').
  sources: dict = dataclasses.field(default_factory=dict)  # Where each model came from (run.json, eval.json).


class SigTerm:
  """Turns SIGTERM (TPU/SLURM preemption notice) into a flag the loop checks between steps."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread.
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing this step, saving a checkpoint, then exiting")
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}


def state_shardings(state: TrainState, mesh):
  """Each leaf keeps the sharding it was created with; scalars replicated."""
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda x: x.sharding if getattr(x, "sharding", None) is not None and x.ndim else rep, state)


def jit_step(step_fn: Callable, state: TrainState, mesh, batch_sharding=None):
  """`step_fn(state, batch)` jitted once: explicit shardings, the state donated, metrics replicated.

  The frozen models pass through (their output aliases the donated input): read them from the state the step
  returned, never from an earlier reference."""
  state_sh = state_shardings(state, mesh)
  bs = sharding.batch_sharding(mesh) if batch_sharding is None else batch_sharding
  return jax.jit(step_fn, in_shardings=(state_sh, bs), out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))


class Watchdog:
  """Warns on the usual signs of reward hacking: KL accelerating, entropy collapsing, length spiking."""

  def __init__(self):
    self.hist: dict[str, list[float]] = {}

  def check(self, step: int, m: dict):
    for k in ("kl", "entropy", "response_length"):
      if k in m:
        self.hist.setdefault(k, []).append(float(m[k]))
    kl, ent, ln = self.hist.get("kl", []), self.hist.get("entropy", []), self.hist.get("response_length", [])
    if len(kl) >= 3 and kl[-1] > 2 * max(kl[-2], 1e-3) and (kl[-1] - kl[-2]) > (kl[-2] - kl[-3]) > 0:
      logging.warning("step %d: KL to the reference is accelerating (%.3g -> %.3g): possible reward hacking; "
                      "raise the KL coefficient or lower the learning rate", step, kl[-2], kl[-1])
    if len(ent) >= 2 and ent[-1] < 0.2 * ent[0]:
      logging.warning("step %d: entropy collapsed to %.3g (from %.3g)", step, ent[-1], ent[0])
    if len(ln) >= 2 and ln[-1] > 2 * np.median(ln[: max(1, len(ln) // 2)]):
      logging.warning("step %d: response length spiked to %.1f tokens", step, ln[-1])


def _restore(ckpt: Checkpointer, step: int, state: TrainState, mesh) -> tuple[TrainState, dict]:
  """The checkpointed state at `step`, placed with this run's shardings; a clear error for another layout."""
  want = checkpoint_items(state)
  sh = state_shardings(want, mesh)
  try:
    items, data_state = ckpt.restore(step, abstract_like(want, sh))
  except ValueError as e:
    if "do not match" not in str(e):
      raise
    raise CheckpointLayoutError(
        f"{ckpt.mngr.directory}/{step}: this checkpoint's state has another layout than this version's "
        f"{sorted(want['meta'])} meta and its {sorted(want['params'])} params (written by an earlier jaxalign, "
        "or by another stage or model): it cannot resume here. Use a new --workdir, or start the next stage "
        "from it with model.init (its params still load)") from e
  return from_items(items, state.frozen), data_state


def run(parts: Parts, config, workdir: str, compile_since: dict | None = None) -> TrainState:
  """Train `parts.state` to train.steps: resume, step, log, eval, checkpoint, stop on SIGTERM, export.

  Everything runs with the stage's mesh in context (`jax.set_mesh`): the model's activation constraints
  (`sharding.constrain`) read it when the steps are traced. `compile_since` (compile_cache.totals() before
  the build): the summary row's compile time is counted from there."""
  with jax.set_mesh(parts.mesh):
    return _run(parts, config, workdir, compile_since)


def _run(parts: Parts, config, workdir: str, compile_since: dict | None = None) -> TrainState:
  nan_policy = config.train.nan_policy
  if nan_policy not in ("stop", "skip"):
    raise ConfigError(f"train.nan_policy={nan_policy!r}: expected stop | skip")
  c = config.checkpoint
  ckpt = Checkpointer(f"{workdir}/checkpoints", keep=c.keep, best_metric=c.best_metric, best_mode=c.best_mode,
                      async_save=c.async_save)
  writer = MetricWriter(workdir, parts.name, config.logging.tensorboard)
  state, mesh, batches = parts.state, parts.mesh, parts.batches
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = _restore(ckpt, latest, state, mesh)
    batches.restore(data_state["train"])
    logging.info("resumed %s from %s step %d (data position %s)", parts.name, ckpt.mngr.directory, latest,
                 batches.state())
    if int(jax.device_get(state.step)) < int(config.train.steps):
      writer.resume_at(latest)  # Rows after the checkpoint are replayed: keep each step once.
  else:  # No checkpoint: rows of an attempt killed before its first save are all replayed.
    writer.resume_at(-1)
  start = int(jax.device_get(state.step))
  total = int(config.train.steps)
  stop_at = min(total, start + config.train.run_steps) if config.train.run_steps else total
  if start >= total:  # A finished run rerun: nothing to train, nothing to append (no duplicate rows).
    logging.info("%s: already at step %d of %d in %s; nothing to do", parts.name, start, total, workdir)
    ckpt.close()
    writer.close()
    return state

  tput, watchdog = Throughput(), Watchdog()
  best, since_best = None, 0
  pending: tuple[int, Any] | None = None
  last_saved = latest
  shapes: set[tuple] = set()
  progress = _progress(config, parts.name, start, total)

  def save(st: TrainState, step: int, metrics=None):
    nonlocal last_saved
    if last_saved != step:
      writer.flush()  # A bucket's metrics.jsonl is uploaded: rows up to a checkpoint survive a hard kill.
      ckpt.save(step, checkpoint_items(st), {"train": batches.state()}, metrics=metrics)
      last_saved = step

  def handle(done_step: int, m_dev):
    """Metrics of an earlier step, fetched now (one step late) or when a decision needs them."""
    m = fetch(m_dev)
    if int(m.get("nonfinite", 0)):
      if nan_policy == "stop":
        ckpt.wait()
        raise NonFiniteError(
            f"non-finite loss or gradient at step {done_step} (loss={float(m.get('loss', float('nan')))}); the "
            f"update was not applied and the last good checkpoint ({last_saved}) is intact; set "
            "train.nan_policy=skip to skip such batches")
      logging.warning("step %d: non-finite loss or gradient, update skipped", done_step)
    if done_step % config.logging.every == 0 or done_step in (total, stop_at):
      writer.write(done_step, "train", {**m, **tput.pop()})
      watchdog.check(done_step, m)

  def evaluate(st: TrainState, step: int) -> dict:
    if parts.evaluate is None:
      return {}
    m = parts.evaluate(st, step, step == total)
    if m:
      writer.write(step, "eval", m)
    return {f"eval/{k}": v for k, v in m.items()}

  if start == 0 and parts.baseline_eval:
    evaluate(state, 0)
  step = start
  with SigTerm() as sig:
    while step < stop_at:
      host_batch = next(batches)
      shapes.add(tuple(v.shape for v in host_batch.values()))
      if "segment_ids" in host_batch:
        tput.add(int((host_batch["segment_ids"] > 0).sum()) * jax.process_count())
      else:
        tput.add(0)
      state, m = parts.step(state, to_device(host_batch, mesh))
      step += 1
      if pending is not None:
        handle(*pending)
      pending = (step, m)
      if progress:
        progress.update(1)
      ev = {}
      if (config.eval.every and step % config.eval.every == 0) or step == total:
        handle(*pending)
        pending = None
        ev = evaluate(state, step)
        if c.best_metric and c.best_metric in ev:
          v = ev[c.best_metric]
          better = best is None or (v < best if c.best_mode == "min" else v > best)
          best, since_best = (v, 0) if better else (best, since_best + 1)
      if step % c.every == 0 or step in (total, stop_at) or sig.flag:
        if pending is not None:
          handle(*pending)
          pending = None
        save(state, step, {k: v for k, v in ev.items() if isinstance(v, (int, float))} or None)
      if c.early_stop and since_best >= c.early_stop:
        logging.info("early stop at step %d: %s did not improve for %d evals", step, c.best_metric, since_best)
        save(state, step, {k: v for k, v in ev.items() if isinstance(v, (int, float))} or None)
        break
      if sig.flag:
        ckpt.close()
        writer.close()
        raise Preempted(f"preempted at step {step}: checkpoint saved in {workdir}/checkpoints; rerun the same "
                        "command to resume")
  if pending is not None:
    handle(*pending)
  if progress:
    progress.close()
  best_step = ckpt.best_step() if c.best_metric else None
  ckpt.close()
  if best_step is not None:  # What a later stage loads from this run (checkpoint.chosen_step), resumed or not.
    best_value = _best_value(workdir, parts.name, c.best_metric, best_step)
    if best_value is not None:
      checkpoint.update_run_info(workdir, best={"step": int(best_step), "metric": c.best_metric, "value": best_value})
  finished = step >= total or (c.early_stop and since_best >= c.early_stop)
  if finished:
    if parts.export is not None:
      parts.export(state)
    writer.write(step, "summary", {"compiles": parts.compiles() if parts.compiles else -1,
                                   "buckets": len({s[0][-1] for s in shapes}), "shapes": len(shapes),
                                   "skipped_updates": int(fetch(state.skipped)),
                                   **compile_summary(compile_since)})
  writer.close()
  if finished and jax.process_index() == 0 and config.logging.report:
    from jaxalign import report

    logging.info("report: %s", report.write(workdir, parts.name))
  return state


def compile_summary(since: dict | None) -> dict:
  """Seconds XLA spent compiling since `since` (compile_cache.totals(); a cache hit costs its read), seconds
  spent tracing and lowering (not cached), and the persistent cache's hits and misses."""
  if since is None:
    return {}
  now = compile_cache.totals()
  return {"compile_seconds": round(now["seconds"] - since["seconds"], 2),
          "trace_seconds": round(now["trace"] - since["trace"], 2),
          "compile_cache_hits": int(now["hits"] - since["hits"]),
          "compile_cache_misses": int(now["misses"] - since["misses"])}


def _best_value(workdir: str, stage: str, metric: str, step: int) -> float | None:
  """The `eval/...` metric's value at `step`, read back from metrics.jsonl's eval row."""
  if jax.process_index() != 0:
    return None
  name = metric[len("eval/"):] if metric.startswith("eval/") else metric
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return None
  for line in paths.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get("stage") == stage and row.get("split") == "eval" and row.get("step") == step and name in row:
      return float(row[name])
  return None


def _progress(config, name: str, start: int, total: int):
  """A progress bar with rate and ETA on the primary process (tqdm), or None."""
  if not config.logging.progress or jax.process_index() != 0:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, mininterval=2.0)

