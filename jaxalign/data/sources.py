"""Load records with Hugging Face `datasets`: a local or bucket (gs://) file or directory, or a hub name when online.

A bucket path is copied to the local cache first (`paths.local_copy`, refreshed only when the objects change):
`datasets` then reads it like any local file, and errors still name the bucket path."""

from __future__ import annotations

import os

import datasets

from jaxalign import paths
from jaxalign.errors import UserError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(UserError):
  """Bad input data; the message names the file and row."""


def load_records(spec: str, split: str = "train", config_key: str = "data.train") -> datasets.Dataset:
  """A `datasets.Dataset` from a path or hub name; errors name the config key and the path."""
  if not spec:
    raise DataError(f"{config_key} is empty: give a JSONL/parquet file, a directory, or a hub dataset name")
  datasets.disable_progress_bars()
  local = spec
  if paths.is_remote(spec):
    paths.check(spec, config_key)
    local = paths.local_copy(spec)
  if os.path.isfile(local):
    ext = os.path.splitext(local)[1].lower()
    if ext not in _BUILDERS:
      raise DataError(f"{config_key}={spec}: unsupported file type {ext!r} (expected {sorted(_BUILDERS)})")
    if os.path.getsize(local) == 0:
      raise DataError(f"{config_key}={spec}: the file is empty (0 bytes); give a file with one record per line")
    try:
      ds = datasets.load_dataset(_BUILDERS[ext], data_files=local, split="train")
    except Exception as e:  # Malformed JSON etc.: name the file and the parser's reason.
      reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(f"{config_key}={spec}: could not be read as {_BUILDERS[ext]}: {reason}") from e
    if len(ds) == 0:
      raise DataError(f"{config_key}={spec}: the file holds no records")
    return ds
  if os.path.isdir(local):
    if os.path.exists(os.path.join(local, "dataset_info.json")) or os.path.exists(os.path.join(local, "dataset_dict.json")):
      ds = datasets.load_from_disk(local)
    else:
      ds = datasets.load_dataset(local)
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise DataError(f"{config_key}={spec}: no split {split!r} (has {list(ds)}); set data.split")
      ds = ds[split]
    return ds
  if spec.startswith((".", "/")) or os.sep in spec and not _looks_like_hub(spec):
    raise DataError(f"{config_key}={spec}: no such file or directory")
  try:
    return datasets.load_dataset(spec, split=split)
  except Exception as e:
    raise DataError(f"{config_key}={spec}: not a local path and could not be loaded from the hub: {e}") from e


def _looks_like_hub(spec: str) -> bool:
  return spec.count("/") == 1 and not os.path.exists(spec.split("/")[0])
