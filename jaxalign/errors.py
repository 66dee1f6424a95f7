"""User mistakes, as opposed to bugs: what the command line prints as one line instead of a traceback.

A `UserError` is raised where a configured value, a data file or a path is wrong, with a message that names
the key (and the file and 1-based row for data) and says what to do. `launch/*.py` print it as
`error: <message>` and exit with code 2; `--verbose` (or `JAXALIGN_VERBOSE=1`) shows the traceback instead.
Every other exception is a bug and keeps its traceback. Each class also derives from ValueError, so code that
caught ValueError before keeps working.
"""

from __future__ import annotations

import os
import re
import sys

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A wrong config value, data file or path; the message is the whole story (no traceback needed)."""


class ConfigError(UserError):
  """A config key with a value the stage cannot use; the message names the key and the fix."""


def verbose() -> bool:
  """Tracebacks wanted: `--verbose` on the command line or JAXALIGN_VERBOSE=1 in the environment."""
  return "--verbose" in sys.argv or os.environ.get("JAXALIGN_VERBOSE", "") not in ("", "0")


def config_flag_message(exc: BaseException, argv: list[str]) -> str | None:
  """One line for an exception raised while ml_collections parsed the `--config.*` overrides, else None.

  A typo'd key arrives as AttributeError/KeyError("'stepz'\\nDid you mean \"steps\" instead of \"stepz\"?");
  a value of the wrong type as a ValueError/TypeError from the override's parser."""
  text = str(exc.args[0]) if exc.args else str(exc)
  overrides = [a for a in argv if a.startswith("--config.")]
  config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the config")
  if isinstance(exc, (AttributeError, KeyError)):
    key = re.match(r"^'?([^'\n]+)'?", text.strip("'\"").replace("\\'", "'"))
    bad = key.group(1) if key else ""
    flag = next((a for a in overrides if re.search(rf"\.{re.escape(bad)}(=|\.|$)", a.split("=", 1)[0])), None)
    if flag is None:
      return None
    name = flag.split("=", 1)[0][len("--config."):]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    parts = name.split(".")
    if hint and bad in parts:
      parts[parts.index(bad)] = hint.group(1)
      fix = f"did you mean {'.'.join(parts)}?"
    else:
      fix = f"see {config.split(':')[0]} for the keys"
    return f"--config.{name}: {config} has no key {name} ({fix})"
  if isinstance(exc, (ValueError, TypeError)) and overrides:
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"a --config.* override could not be applied to {config}: {first}"
  return None


def run_main(app_run, main) -> None:
  """absl's `app.run(main)` with user mistakes printed as one line (exit 2) unless `verbose()`."""
  if "--verbose" in sys.argv:
    sys.argv.remove("--verbose")
    os.environ["JAXALIGN_VERBOSE"] = "1"
  argv = list(sys.argv)
  started = []

  def main_after_parsing(args):
    started.append(True)
    return main(args)

  try:
    app_run(main_after_parsing)
  except UserError as e:
    if verbose():
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  except (AttributeError, KeyError, ValueError, TypeError) as e:  # Only while the flags are parsed.
    message = None if started or verbose() else config_flag_message(e, argv)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
