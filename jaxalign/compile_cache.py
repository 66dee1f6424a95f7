"""Compile once, not once per run: JAX's persistent compilation cache, on by default, and a clock of the time a
process spends compiling.

A rerun, a resumed run, the next stage with the same shapes and the quickstart's later stages (evaluation
compiles the sampler GRPO compiled) load their programs from the cache instead of compiling them again.
Where: `$JAXALIGN_COMPILE_CACHE` if set (a directory, or `off`), else JAX's own `$JAX_COMPILATION_CACHE_DIR`,
else `$XDG_CACHE_HOME/jaxalign/xla` (`~/.cache/jaxalign/xla`). Entries are keyed by the program, the
compiler version and the device kind, so one directory serves every project and machine type; delete it to
reclaim the space.
"""

from __future__ import annotations

import collections
import contextlib
import os

import jax

OFF = ("0", "off", "false", "no", "none")
# XLA's compile (or, on a cache hit, the cache read); tracing and lowering to MLIR run either way.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_totals: collections.Counter = collections.Counter()
_listening = False


def directory() -> str | None:
  """The cache directory in effect (None: off)."""
  v = os.environ.get("JAXALIGN_COMPILE_CACHE", "").strip()
  if v.lower() in OFF:
    return None
  if v:
    return v
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxalign", "xla")


def enable() -> str | None:
  """Turn the persistent cache on (before the first compile); returns its directory. Programs that compile in
  under 0.2 s are not worth a file (JAX's default threshold, 1 s, would skip most CPU programs)."""
  listen()
  d = directory()
  if d is None:
    return None
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return d


@contextlib.contextmanager
def no_new_entries():
  """Writes nothing to the persistent cache while inside. Programs compiled for a TPU topology on a host
  without a TPU (the compile plan) serialise but can never be loaded back: a later plan of the same shapes
  would read each such entry, warn that it cannot deserialise it, and compile anyway."""
  key = "jax_persistent_cache_min_compile_time_secs"
  old = getattr(jax.config, key)
  jax.config.update(key, float("inf"))
  try:
    yield
  finally:
    jax.config.update(key, old)


def listen():
  """Count compile time and cache hits from JAX's monitoring events (once per process)."""
  global _listening
  if _listening:
    return
  _listening = True

  def duration(name, secs, **_):
    if name == COMPILE_EVENT:
      _totals["seconds"] += secs
    elif name in TRACE_EVENTS:
      _totals["trace"] += secs

  def event(name, **_):
    if name == "/jax/compilation_cache/cache_hits":
      _totals["hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
      _totals["misses"] += 1

  jax.monitoring.register_event_duration_secs_listener(duration)
  jax.monitoring.register_event_listener(event)


def totals() -> dict[str, float]:
  """{'seconds': XLA compiling (cache reads on hits) so far, 'trace': tracing and lowering, 'hits', 'misses':
  persistent-cache lookups}."""
  return {k: float(_totals[k]) for k in ("seconds", "trace", "hits", "misses")}
