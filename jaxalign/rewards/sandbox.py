"""Run untrusted code (a model's completion) against a row's tests: a subprocess in a temporary directory,
with a wall-clock timeout, memory / CPU / file-size limits, no network, no writes outside its directory, no
child processes, killed with its whole process group on timeout.

Limits are set with `resource` first thing in the child (before the completion's code); the rest is a Python
audit hook (PEP 578, which cannot be removed once installed) in the child, refusing socket use, process
creation, ctypes, and any file opened for writing, removed, renamed or created outside the temporary
directory. It is a guard against
accidents and reward hacking by a policy, not a boundary against a determined attacker: for untrusted users'
code run it in a container or VM as well.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

_LIMITS = r'''
import resource
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
'''

_GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
def _inside(p):
    try:
        return os.path.realpath(os.fsdecode(p)).startswith(_ROOT + os.sep) or os.path.realpath(os.fsdecode(p)) == _ROOT
    except Exception:
        return False
def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.fork", "os.system",
                         "ctypes.", "os.kill", "os.killpg", "pty.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
        if isinstance(args[0], (str, bytes, os.PathLike)) and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]} is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
                 "os.truncate", "shutil.rmtree", "shutil.copyfile", "shutil.move"):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a} is not allowed")
sys.addaudithook(_guard)
del _guard
'''

_RUNNER = r'''
import json, sys
code, tests = json.load(open("job.json"))
ns = {"__name__": "__main__"}
passed = 0
try:
    exec(compile(code, "solution.py", "exec"), ns)
    ok = True
except BaseException as e:
    ok = False
    print(json.dumps({"passed": 0, "total": len(tests), "error": f"{type(e).__name__}: {e}"[:200]}))
if ok:
    for t in tests:
        try:
            exec(compile(t, "test.py", "exec"), ns)
            passed += 1
        except BaseException:
            pass
    print(json.dumps({"passed": passed, "total": len(tests)}))
'''


def extract_code(completion: str) -> str:
  """The last ```python (or plain ```) block of a completion, else the completion itself."""
  blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", completion, re.S)
  return blocks[-1] if blocks else completion


_EXEC = r'''
import contextlib, io, json
code = json.load(open("job.json"))
buf = io.StringIO()
err = None
try:
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "snippet.py", "exec"), {"__name__": "__main__"})
except BaseException as e:
    err = f"{type(e).__name__}: {e}"[:200]
print(json.dumps({"stdout": buf.getvalue()[-4000:], "error": err}))
'''


def _sandboxed(job, runner: str, timeout: float, memory_mb: int) -> tuple[dict | None, str]:
  """Run `runner` (reading job.json) in a fresh sandbox: (its last JSON line, '') or (None, why not)."""
  with tempfile.TemporaryDirectory(prefix="jaxalign-sandbox-") as d:
    with open(os.path.join(d, "job.json"), "w") as f:
      json.dump(job, f)
    with open(os.path.join(d, "main.py"), "w") as f:
      f.write(_LIMITS.format(memory=memory_mb << 20, cpu=int(timeout) + 1) + _GUARD + runner)
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "HOME": d}
    proc = subprocess.Popen([sys.executable, "-I", "-S", "main.py"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # The child and anything it managed to start.
      proc.communicate()
      return None, f"timeout after {timeout:g} s"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
      return None, f"exit code {proc.returncode}"
    return json.loads(lines[-1]), ""


def run_tests(code: str, tests: list[str], *, timeout: float = 10.0, memory_mb: int = 512) -> dict:
  """{'passed', 'total', ['error']}: `code` run once, then each test snippet (an assert) in its namespace."""
  out, why = _sandboxed([code, list(tests)], _RUNNER, timeout, memory_mb)
  return out if out is not None else {"passed": 0, "total": len(tests), "error": why}


def run_code(code: str, *, timeout: float = 10.0, memory_mb: int = 512) -> dict:
  """{'stdout', 'error'}: what `code` prints (its last 4,000 characters) and the exception it ended with
  (None if none), under the same sandbox; a timeout or a killed child is an error with empty stdout."""
  out, why = _sandboxed(code, _EXEC, timeout, memory_mb)
  return out if out is not None else {"stdout": "", "error": why}


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2))),
                                              thread_name_prefix="sandbox")


def code_tests(prompts, completions, tests=None, **_):
  """Reward: the fraction of the row's `tests` (a list of assert snippets, or one string of them) the
  completion's code passes, each row in its own sandboxed subprocess, run in parallel on a bounded pool.
  None where a row has no tests."""
  rows = tests if tests is not None else [None] * len(completions)
  jobs = []
  for c, t in zip(completions, rows):
    if t is None:
      jobs.append(None)
      continue
    t = [t] if isinstance(t, str) else list(t)
    jobs.append(_POOL.submit(run_tests, extract_code(c), t))
  out = []
  for j in jobs:
    if j is None:
      out.append(None)
      continue
    r = j.result()
    out.append(r["passed"] / max(r["total"], 1))
  return out
