"""Orbax checkpoints: named items saved together, restored with the run's shardings, and stage linking.

A run directory holds `run.json` (stage, model config, tokenizer, where each model came from) and
`checkpoints/<step>/` with items such as `params`, `opt_state`, `meta` (step, rng, counters) and `data`
(the data position, JSON). Orbax writes each checkpoint to a temporary directory and renames it when
complete (on GCS, where a rename is a copy: in place, then a commit marker file), so a checkpoint interrupted
mid-write is never picked up. Every path may be local or a bucket (gs://): orbax writes through tensorstore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign import paths
from jaxalign.models.config import ModelConfig

RUN_FILE = "run.json"


class Checkpointer:
  """CheckpointManager over named pytree items plus a JSON data-position item."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "", best_mode: str = "min",
               async_save: bool = True, items: tuple[str, ...] = ("params", "opt_state", "meta")):
    self.items = items
    best_fn = None
    if best_metric:
      best_fn = lambda m: float(m.get(best_metric, float("inf") if best_mode == "min" else float("-inf")))  # noqa: E731
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, best_fn=best_fn, best_mode=best_mode, keep_checkpoints_without_metrics=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.mngr = ocp.CheckpointManager(paths.resolve(directory), options=opts,
                                      item_names=(*items, "data"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without a metric or before any eval)."""
    try:
      return self.mngr.best_step()
    except Exception:  # No best_fn configured.
      return None

  def save(self, step: int, items: dict[str, Any], data_state: dict, metrics: dict | None = None,
           force: bool = True) -> bool:
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    args["data"] = ocp.args.JsonSave(data_state)
    return self.mngr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)

  def restore(self, step: int, abstract: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restore the items named in `abstract` (ShapeDtypeStructs carrying target shardings) and the data state."""
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
    args["data"] = ocp.args.JsonRestore()
    out = self.mngr.restore(step, args=ocp.args.Composite(**args))
    return {k: out[k] for k in abstract}, out["data"]

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of `tree`, with the given shardings (or each leaf's own)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------- run records

def write_run_info(workdir: str, info: dict):
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    paths.write_json(paths.join(workdir, RUN_FILE), info, default=str)


def read_run_info(workdir: str) -> dict:
  return json.loads(paths.read_text(paths.join(workdir, RUN_FILE)))


def is_run_dir(path: str) -> bool:
  return bool(path) and paths.exists(paths.join(path, RUN_FILE))


def model_config_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
  """ModelConfig from run.json; fields this version does not know (from older/newer runs) are dropped."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    logging.warning("run.json model_config: ignoring fields unknown to this version: %s", unknown)
  d = {k: v for k, v in d.items() if k in known}
  for k in ("rope_scaling",):
    if d.get(k) is not None:
      d[k] = tuple(tuple(x) for x in d[k])
  for k in ("layer_types", "eos_token_id", "lora_targets"):
    if isinstance(d.get(k), list):
      d[k] = tuple(d[k])
  return ModelConfig(**d)


def update_run_info(workdir: str, **fields):
  """Add fields to WORKDIR/run.json (the primary process writes)."""
  if jax.process_index() == 0 and is_run_dir(workdir):
    info = read_run_info(workdir)
    info.update(fields)
    paths.write_json(paths.join(workdir, RUN_FILE), info, default=str)


def chosen_step(run_dir: str, steps) -> tuple[int | None, str]:
  """The step a later stage loads from a run: its best checkpoint when the run kept one by
  `checkpoint.best_metric` (recorded in run.json as `best`), else the latest. Returns (step, why)."""
  steps = sorted(steps)
  best = read_run_info(run_dir).get("best") if is_run_dir(run_dir) else None
  if best and best.get("step") in steps:
    return int(best["step"]), f"best {best['metric']}={best['value']:.4g}"
  return (steps[-1] if steps else None), "latest"


def restore_params_from_run(run_dir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
  """The `params` item of a run's checkpoint (`chosen_step`: the best by the run's `checkpoint.best_metric`
  when it kept one, else the latest; or `step`), restored with the given shardings.

  `abstract_params` may name a subset of what was saved (e.g. only 'model' from a reward checkpoint).
  """
  ckpt_dir = paths.join(paths.resolve(run_dir), "checkpoints")
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"params": ocp.StandardCheckpointHandler()})
  why = "given"
  if step is None:
    step, why = chosen_step(run_dir, mngr.all_steps())
  if step is None:
    raise FileNotFoundError(f"{run_dir}: a jaxalign run directory but it has no complete checkpoint")
  saved = mngr.item_metadata(step)["params"]
  missing = [k for k in abstract_params if k not in saved]
  if missing:
    raise KeyError(f"{run_dir} step {step}: checkpoint params have {sorted(saved)}, not {missing}")
  full = {k: (abstract_params[k] if k in abstract_params else
              jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[k])) for k in saved}
  for k in abstract_params:
    _check_shapes(run_dir, k, saved[k], abstract_params[k])
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(full)))["params"]
  mngr.close()
  logging.info("restored %s from %s step %d (%s)", sorted(abstract_params), run_dir, step, why)
  return {k: out[k] for k in abstract_params}, int(step)


def _check_shapes(where: str, name: str, saved, want):
  s = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  w = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(want)[0]}
  if s != w:
    diff = sorted(set(s.items()) ^ set(w.items()))[:4]
    raise ValueError(f"{where}: checkpoint '{name}' does not match the configured architecture "
                     f"(first differences: {diff})")
