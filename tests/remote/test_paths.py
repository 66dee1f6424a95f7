"""The path layer against a real (emulated) GCS server: reads, writes, copies, and one-line errors."""

import os

import pytest

from jaxalign import paths

pytestmark = pytest.mark.xdist_group("gcs")  # One emulator per worker: with test_gcs_runs.py.


def test_write_read_join_and_exists(gcs_url):
  d = "gs://bucket/paths/a"
  assert paths.join(d, "x", "y.txt") == "gs://bucket/paths/a/x/y.txt"
  paths.write_json(paths.join(d, "x", "y.json"), {"k": 1})
  assert paths.read_text(paths.join(d, "x", "y.json")).startswith("{")
  assert paths.exists(paths.join(d, "x", "y.json")) and paths.isdir(paths.join(d, "x"))
  assert not paths.exists(paths.join(d, "nope"))
  assert paths.resolve(d) == d and paths.resolve("rel") == os.path.abspath("rel")


def test_local_copy_of_a_directory_skips_weights_and_refreshes(gcs_url, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "hf"
  (src / "sub").mkdir(parents=True)
  (src / "config.json").write_text("{}")
  (src / "sub" / "tok.txt").write_text("a")
  (src / "model.safetensors").write_bytes(b"0" * 100)
  paths.upload(str(src), "gs://bucket/copy/hf")
  local = paths.local_copy("gs://bucket/copy/hf", skip_weights=True)
  assert sorted(os.listdir(local)) == ["config.json", "sub"]
  assert open(os.path.join(local, "sub", "tok.txt")).read() == "a"
  paths.write_text("gs://bucket/copy/hf/sub/tok.txt", "bb")
  assert open(os.path.join(paths.local_copy("gs://bucket/copy/hf"), "sub", "tok.txt")).read() == "bb"
  assert paths.local_copy(str(src)) == str(src)


def test_missing_object_and_missing_bucket_name_key_and_path(gcs_url):
  with pytest.raises(paths.PathError, match=r"^data.train=gs://bucket/none.jsonl: not found$"):
    paths.check("gs://bucket/none.jsonl", "data.train")
  with pytest.raises(paths.PathError, match=r"^model.init=gs://nobucket/m: not found \(bucket gs://nobucket does "
                                            r"not exist"):
    paths.check("gs://nobucket/m", "model.init")
  with pytest.raises(paths.PathError, match=r"^model.init=/no/such/dir: not found"):
    paths.check("/no/such/dir", "model.init")


def test_permission_denied_is_one_line(gcs_url, monkeypatch):
  """The emulator has no IAM: make the store answer 403 the way gcsfs reports it."""
  import gcsfs

  async def forbidden(self, path, **kw):
    raise OSError(f"Forbidden: https://storage.googleapis.com/storage/v1/b/{path}\nno storage.objects.get access")

  monkeypatch.setattr(gcsfs.GCSFileSystem, "_info", forbidden)
  gcsfs.GCSFileSystem.clear_instance_cache()  # Instances bind their sync methods when made.
  with pytest.raises(paths.PathError, match=r"^reward.init=gs://bucket/rm: permission denied \(Forbidden: "):
    paths.check("gs://bucket/rm", "reward.init")
  monkeypatch.undo()
  gcsfs.GCSFileSystem.clear_instance_cache()
