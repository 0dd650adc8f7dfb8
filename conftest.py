"""Settings every pytest run and every nbval kernel inherits (kernels get this process's environment).

OpenMP's passive wait policy must be set before torch is first imported: with the default (spinning) policy,
two torch threads on a 2-core machine that is also running something else stall each other (measured 6x
slower steps). `shared/__init__.py` sets it too, for notebooks opened in Jupyter.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# nbval compares the committed outputs, which are the cpu size's: pin it, also on a GPU machine (where the size would
# otherwise switch to gpu, and shared.device() with it). No progress bars: their text would be compared output.
os.environ.setdefault("LLMP_SIZE", "cpu")
os.environ["LLMP_PROGRESS"] = "0"

# Under pytest-xdist (`pytest -n 2`: two workers, each executing one notebook at a time) every kernel gets one
# torch thread: two notebooks side by side with one thread each finish sooner than one after the other with two
# threads each (a tiny GPT's step gains only 1.4x from a second thread; kernel start, imports and plotting gain
# nothing), and two-thread kernels on two busy cores would oversubscribe them. LLMP_THREADS set by hand wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("LLMP_THREADS", "1")

# Seconds per test file (a notebook's cells summed), printed at the end of the run: the CI log then shows which
# notebook costs what, against each one's budget, without a second timed run.
_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_per_file:
        return
    terminalreporter.section("seconds per file (setup + call + teardown)")
    for path, seconds in sorted(_seconds_per_file.items(), key=lambda kv: -kv[1]):
        if seconds >= 1.0:
            terminalreporter.write_line(f"{seconds:7.1f}  {path}")
