"""One path layer: every path the project reads or writes may be local or a bucket (gs://, and s3:// or any
other fsspec scheme whose package is installed).

`etils.epath` (orbax's own path type, with gcsfs/fsspec underneath for buckets) does the work; these are the
few helpers every caller needs on top of it. Local paths behave exactly as `os.path` did. What cannot read a
bucket itself (transformers' `from_pretrained`, `datasets`) gets a local copy made by `local_copy`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

from jaxalign.errors import UserError

# Weight files are read in place (ranged reads, `models.hf.SafetensorsDir`), never copied by `local_copy`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


class PathError(UserError):
  """A configured path that is missing or unreadable; the message names the config key and the path."""


def is_remote(path) -> bool:
  return "://" in str(path)


def resolve(path) -> str:
  """The form to record and hand to orbax: local paths made absolute, URLs unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
  return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def exists(path) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def open(path, mode: str = "r"):  # noqa: A001 - the path layer's `open`.
  return epath.Path(path).open(mode)


def makedirs(path):
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)  # A no-op on GCS (no directories), kept for s3/others.
  else:
    os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
  with open(path) as f:
    return f.read()


def write_text(path, text: str):
  """Write a whole file atomically: a local temp file renamed over it; an object upload (atomic by itself)."""
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with builtins.open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path, obj, **kw):
  write_text(path, json.dumps(obj, **{"indent": 2, **kw}))


def check(path: str, key: str) -> str:
  """`path` if it exists and is readable, else a PathError naming `key`: not found (object or bucket) or
  permission denied. Remote paths only ask the store (one metadata request); local ones `os.stat`."""
  if not is_remote(path):
    if not os.path.exists(path):
      raise PathError(f"{key}={path}: not found (no such file or directory)")
    if not os.access(path, os.R_OK):
      raise PathError(f"{key}={path}: permission denied")
    return path
  import fsspec

  try:
    fs, inner = fsspec.core.url_to_fs(str(path))
  except (ImportError, ValueError) as e:  # No filesystem package for this scheme.
    raise PathError(f"{key}={path}: cannot be read: {e}") from e
  try:
    fs.info(inner)
    return path
  except FileNotFoundError:
    bucket = inner.split("/", 1)[0]
    if bucket != inner.rstrip("/") and not _bucket_exists(fs, bucket):
      raise PathError(f"{key}={path}: not found (bucket {path.split('://')[0]}://{bucket} does not exist or is "
                      "not visible to these credentials)") from None
    raise PathError(f"{key}={path}: not found") from None
  except PermissionError as e:
    raise PathError(f"{key}={path}: permission denied ({_first_line(e)})") from None
  except Exception as e:  # gcsfs: 403 is OSError('Forbidden: ...'); 401 an HttpError.
    msg = _first_line(e)
    if "Forbidden" in msg or "403" in msg or "401" in msg or "Unauthorized" in msg or "credentials" in msg.lower():
      raise PathError(f"{key}={path}: permission denied ({msg})") from None
    raise PathError(f"{key}={path}: cannot be read ({type(e).__name__}: {msg})") from None


def _bucket_exists(fs, bucket: str) -> bool:
  try:
    fs.info(bucket)
    return True
  except FileNotFoundError:
    return False
  except Exception:  # Listing buckets may be forbidden where reading objects is not: say only "not found".
    return True


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------- local copies

def cache_root() -> str:
  return os.environ.get("JAXALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxalign"))


def local_copy(path: str, *, skip_weights: bool = False) -> str:
  """A local path with the contents of `path`: the path itself when local, else a copy of the file or directory
  (recursively) under `cache_root()/remote/`, refreshed where size or etag changed.

  Why: transformers' `from_pretrained` and `datasets` read local files only. `skip_weights` leaves weight
  files in the bucket (an HF directory's config and tokenizer are a few MB; its weights are read in place)."""
  if not is_remote(path):
    return path
  src = epath.Path(path)
  root = os.path.join(cache_root(), "remote", hashlib.sha256(str(src).encode()).hexdigest()[:16])
  dst = os.path.join(root, src.name)
  stamps = os.path.join(root, ".stamps")  # Beside the copy, not in it: a dataset directory must hold data only.
  if src.is_file():
    _fetch(src, dst, os.path.join(stamps, src.name))
    return dst
  for f in _files(src):
    if not (skip_weights and f.name.endswith(WEIGHT_SUFFIXES)):
      rel = str(f)[len(str(src)):].lstrip("/")
      _fetch(f, os.path.join(dst, rel), os.path.join(stamps, src.name, rel))
  os.makedirs(dst, exist_ok=True)
  return dst


def _files(d: epath.Path) -> Iterator[epath.Path]:
  """Files under `d`, recursively (epath refuses `**` on buckets)."""
  for f in d.iterdir():
    if f.is_dir():
      yield from _files(f)
    else:
      yield f


def _fetch(src: epath.Path, dst: str, stamp_file: str):
  """Download one object to `dst` unless the copy there matches (size and etag); atomic for readers."""
  import fsspec

  fs, inner = fsspec.core.url_to_fs(str(src))
  info = fs.info(inner)
  stamp = json.dumps([info.get("size"), info.get("etag") or info.get("ETag") or info.get("generation")
                      or str(info.get("mtime") or info.get("updated"))], default=str)
  if os.path.exists(dst) and os.path.exists(stamp_file):
    with builtins.open(stamp_file) as f:
      if f.read() == stamp:
        return
  for d in (os.path.dirname(dst), os.path.dirname(stamp_file)):
    os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".part")
  with os.fdopen(fd, "wb") as out, src.open("rb") as f:
    shutil.copyfileobj(f, out, 16 << 20)
  os.replace(tmp, dst)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(stamp_file), prefix=".part")
  with os.fdopen(fd, "w") as f:
    f.write(stamp)
  os.replace(tmp, stamp_file)


@contextlib.contextmanager
def writable_dir(path: str) -> Iterator[str]:
  """A local directory to write into that ends up at `path`: `path` itself when local, else a temporary
  directory uploaded file by file on exit (for writers that only take local paths: `save_pretrained`)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="jaxalign_upload_") as tmp:
    yield tmp
    upload(tmp, path)


def upload(local_dir: str, path: str):
  """Copy a local directory's files to `path` (a bucket prefix), overwriting."""
  dst = epath.Path(path)
  for root, _, files in os.walk(local_dir):
    for fn in files:
      src = os.path.join(root, fn)
      target = dst.joinpath(os.path.relpath(src, local_dir))
      with builtins.open(src, "rb") as f, target.open("wb") as out:
        shutil.copyfileobj(f, out, 16 << 20)
