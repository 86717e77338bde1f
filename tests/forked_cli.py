"""``python -m ttt_meta`` cases, each in a process of its own forked from one that has already imported ttt_meta:
a case's process starts in milliseconds instead of the seconds that importing torch and Lightning take.

Run as a script, it reads one JSON object per line on stdin, ``{"args": [...], "cwd": "..."}``, forks a process
per case that runs the ``ttt_meta`` module as ``python -m ttt_meta ARGS`` would (its own working folder, standard
output and error, exit status; an uncaught exception printed with its traceback and exit status 1, as the
interpreter does), waits for all of them, and writes one JSON object per case, in order:
``{"returncode", "stdout", "stderr"}``. Nothing has run a torch operation before the forks. A case with
``"meet_before": "module:function"`` calls that function only once every such case's process has reached it (a
barrier), so that they race there.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ttt_meta.cli  # noqa: F401  (the imports every case shares)


def run_case(args: list[str], cwd: str, out: int, err: int) -> None:
    """In the forked child: run ``python -m ttt_meta ARGS`` in `cwd` with stdout/stderr on fds `out`/`err`."""
    os.chdir(cwd)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = ["python -m ttt_meta", *args]
    try:
        runpy.run_module("ttt_meta", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def meet_before(target: str, arrived: Path, count: int) -> None:
    """In the forked child: `target` (``module:function``) waits until `count` processes have reached it (a file
    each in the folder `arrived`; at most 120 s), then runs."""
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    function = getattr(module, name)

    def gated(*args, **kwargs):
        (arrived / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(arrived.iterdir())) < count and time.monotonic() < deadline:
            time.sleep(0.001)
        return function(*args, **kwargs)

    setattr(module, name, gated)


def main() -> None:
    cases = [json.loads(line) for line in sys.stdin if line.strip()]
    targets = {case["meet_before"] for case in cases if "meet_before" in case}
    barriers = {target: tempfile.TemporaryDirectory() for target in targets}  # removed when this process exits
    running = []
    for case in cases:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:
            if "meet_before" in case:
                target = case["meet_before"]
                meet_before(target, Path(barriers[target].name), sum(c.get("meet_before") == target for c in cases))
            run_case(case["args"], case["cwd"], out.fileno(), err.fileno())
        running.append((pid, out, err))
    for pid, out, err in running:
        _, status = os.waitpid(pid, 0)
        out.seek(0), err.seek(0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(),
                          "stderr": err.read().decode()}), flush=True)


if __name__ == "__main__":
    main()
