"""A real GCS server on 127.0.0.1 for tests: the pure-Python `gcp-storage-emulator`, in its own process.

`emulator()` starts it on a free local port, points every client at it through the environment (inherited by
subprocesses) and stops it at the end:
  STORAGE_EMULATOR_HOST      gcsfs and google-cloud-storage (epath, datasets copies, TensorBoard)
  TENSORSTORE_GCS_HTTP_URL   tensorstore (orbax's checkpoints)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   else gcsfs probes each bucket over gRPC (a 60 s timeout here)
  FSSPEC_GCS_TOKEN=anon, GOOGLE_AUTH_TOKEN_FOR_TESTING, NO_GCE_CHECK   anonymous: no credential lookup, and no
                             metadata-server probe (GCE_METADATA_* point at a closed local port besides)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator


def free_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def env_for(url: str) -> dict[str, str]:
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "FSSPEC_GCS_TOKEN": "anon", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous", "NO_GCE_CHECK": "true",
          "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
          "GOOGLE_CLOUD_PROJECT": "test"}


@contextlib.contextmanager
def emulator(bucket: str = "bucket") -> Iterator[str]:
  """Yields the emulator's URL with `bucket` created and the environment set; restores both afterwards."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  old = {k: os.environ.get(k) for k in env_for(url)}
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError(f"gcp-storage-emulator did not start on 127.0.0.1:{port}")
        time.sleep(0.1)
    os.environ.update(env_for(url))
    import fsspec.config
    gcs_conf = fsspec.config.conf.get("gcs")
    fsspec.config.conf["gcs"] = {**(gcs_conf or {}), "token": "anon"}  # The env var is read at import only.
    _reset_clients()
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    if "gcs_conf" in locals():
      if gcs_conf is None:
        fsspec.config.conf.pop("gcs", None)
      else:
        fsspec.config.conf["gcs"] = gcs_conf
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _reset_clients()


def _reset_clients():
  """gcsfs caches filesystem instances (with the endpoint they were made for): forget them."""
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass


def serve(port: int, bucket: str):
  """The emulator on 127.0.0.1:`port`, in memory, with `bucket`; media downloads also carry the object's
  generation headers, as real GCS sends them (tensorstore's OCDBT reads `x-goog-generation` back to commit
  its manifest: without it every second checkpoint item fails with "Malformed StorageGeneration")."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # Not found: the download handler answered already.
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  objects.download = download  # `objects.get` (?alt=media) calls it by name; the routes hold it directly.
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is original:
        handlers[method] = download
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  import logging
  logging.disable(logging.CRITICAL)
  serve(int(sys.argv[1]), sys.argv[2])
