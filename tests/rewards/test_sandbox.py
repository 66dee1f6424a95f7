"""The code-execution verifier's sandbox: tests pass or fail as written; its timeout, memory limit, directory
and network guards hold; a hung program is killed on time (issue 20)."""

import os
import socket
import threading
import time

from jaxalign.rewards import sandbox, verifiers  # noqa: F401


def test_fraction_of_tests_passed_from_a_fenced_completion():
  comps = ["Here:\n```python\ndef f(x):\n  return 2 * x\n```", "def f(x): return x", "```python\nsyntax error(\n```"]
  tests = [["assert f(2) == 4", "assert f(0) == 0"]] * 3
  assert sandbox.code_tests(None, comps, tests=tests) == [1.0, 0.5, 0.0]
  assert sandbox.code_tests(None, ["x"], tests=[None]) == [None]


def test_timeout_kills_a_hung_program_on_time():
  t = time.time()
  r = sandbox.run_tests("import time\nwhile True: time.sleep(0.01)", ["assert True"], timeout=1.5)
  assert r["passed"] == 0 and "timeout" in r["error"] and time.time() - t < 5


def test_memory_limit():
  r = sandbox.run_tests("x = bytearray(3 * 1024 ** 3)", ["assert True"], memory_mb=256)
  assert r["passed"] == 0 and "MemoryError" in r["error"]


def test_cannot_write_outside_its_directory_but_can_inside(tmp_path):
  target = tmp_path / "escape.txt"
  r = sandbox.run_tests(f"open({str(target)!r}, 'w').write('x')", ["assert True"])
  assert r["passed"] == 0 and "not allowed" in r["error"] and not target.exists()
  r = sandbox.run_tests(f"import os\nos.remove({str(tmp_path)!r})", ["assert True"])
  assert "not allowed" in r["error"] and tmp_path.exists()
  assert sandbox.run_tests("open('ok.txt', 'w').write('x')", ["assert open('ok.txt').read() == 'x'"])["passed"] == 1


def test_no_network_and_no_processes():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  port = server.getsockname()[1]
  hits = []
  threading.Thread(target=lambda: hits.append(server.accept()), daemon=True).start()
  r = sandbox.run_tests(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))", ["assert True"])
  time.sleep(0.5)
  assert r["passed"] == 0 and "not allowed" in r["error"] and not hits
  server.close()
  for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
               "import ctypes\nctypes.CDLL(None)"):
    assert "not allowed" in sandbox.run_tests(code, ["assert True"])["error"], code
