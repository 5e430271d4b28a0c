"""How the suite runs in several processes (pytest-xdist), as hooks that tests/conftest.py takes in.

* Workers: `-n auto` (pyproject.toml's `addopts`) is twice the cores, at least 2 (the fault,
  end-to-end and integration tests spend most of their time waiting on servers and outages);
  `HERALD_TEST_WORKERS` sets another number and `-n 0` runs everything in one process (so does
  `--pdb`).
* Order: the layers that take longest start first (`START_FIRST`), so that the last tests to
  finish are short ones.
* The fault tests (tests/fault) break servers on purpose and time how the services recover, with
  the fake providers in the test process: they are the ones that suffer when the CPU is busy
  (four at once on 2 cores, some missed their deadlines). Half of the workers
  (`FAULT_SLOTS_PER_WORKER`: gw0 and gw1 of 4) run them, one each at a time, before anything
  else; the other workers run everything else meanwhile. (Running the others at a lower CPU
  priority starved their own services' start-up whenever the machine was busy: not done.)
* The tests of a module with a module-scoped fixture (the browser, imported broker definitions)
  go to one worker together, so that the fixture is set up once.
* A worker's output never reaches the terminal: the `FAULT …` lines of the fault tests come back
  with their reports (`tests.support.faults.emit`) and the controller prints them.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]  # no py.typed

from tests.support.faults import FAULT_LINES

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

WORKERS_PER_CORE = 2
START_FIRST = ("fault", "containers", "e2e", "browser", "integration")
FAULT_PREFIX = "tests/fault/"
FAULT_SLOTS_PER_WORKER = 0.5


def _layer(item: pytest.Item) -> str:
    return Path(str(item.fspath)).relative_to(TESTS).parts[0]


def _fault_slots(workers: int) -> int:
    return max(1, int(workers * FAULT_SLOTS_PER_WORKER))


def _runs_fault_tests(worker_id: str, workers: int) -> bool:
    """Workers gw0 … gw<slots-1> run the fault tests."""
    return worker_id.startswith("gw") and int(worker_id[2:]) < _fault_slots(workers)


@pytest.hookimpl
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    configured = os.environ.get("HERALD_TEST_WORKERS")
    if configured:
        return int(configured)
    return max(2, WORKERS_PER_CORE * (os.cpu_count() or 1))


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        _controller.append(config)  # the controller (or the only process)


def order(items: list[pytest.Item]) -> None:
    """The layers in `START_FIRST` first (tests/conftest.py calls this after marking them)."""
    rank = {layer: index for index, layer in enumerate(START_FIRST)}
    items.sort(key=lambda item: rank.get(_layer(item), len(START_FIRST)))  # a stable sort


# --- scheduling (in the controller) -----------------------------------------------------------


@functools.cache
def _has_module_fixture(module: str) -> bool:
    """Whether the test module defines a fixture of module (or class, or package) scope."""
    for node in ast.walk(ast.parse((ROOT / module).read_bytes())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and any(
                    keyword.arg == "scope"
                    and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value in {"module", "class", "package"}
                    for keyword in decorator.keywords
                ):
                    return True
    return False


class _Scheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
    """pytest-xdist's `loadscope` with units of our own: each test is a unit, except the tests of
    a module with a module-scoped fixture, which form one. A worker gets its next unit when it
    has two tests or fewer left: the first fault test if it runs fault tests and one is left,
    else the first unit in the queue (the largest units first, then in collection order) that it
    may run. (pytest-xdist's own `loadgroup` would group by `xdist_group` marks, but 3.8.0 cannot
    tag node ids under pytest 9.2, so it ignores them.)"""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if _has_module_fixture(module) else nodeid

    def _may_run_fault_tests(self, node: Any) -> bool:
        if _runs_fault_tests(node.gateway.id, self.numnodes):
            return True
        # A crashed worker's replacement has a new id: if no fault worker is left, any worker.
        return not any(
            _runs_fault_tests(other.gateway.id, self.numnodes) and not other.shutting_down
            for other in self.assigned_work
        )

    def _assign_work_unit(self, node: Any) -> None:
        fault = self._may_run_fault_tests(node)
        units = list(self.workqueue)
        chosen = next((scope for scope in units if fault and scope.startswith(FAULT_PREFIX)), None)
        if chosen is None:
            chosen = next(
                (scope for scope in units if fault or not scope.startswith(FAULT_PREFIX)), None
            )
        if chosen is None:  # only fault tests are left, and this worker does not run them
            if not self._pending_of(self.assigned_work.get(node, {})):
                node.shutdown()
            return
        work_unit = self.workqueue.pop(chosen)
        self.assigned_work.setdefault(node, {})[chosen] = work_unit
        collection = self.registered_collections[node]
        node.send_runtest_some(
            [collection.index(nodeid) for nodeid, done in work_unit.items() if not done]
        )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist load` (what `-n` means unless `--dist` says otherwise) schedules as above."""
    if config.getvalue("dist") == "load":
        return _Scheduling(config, log)
    return None


# --- what workers print (in the controller) ---------------------------------------------------

_controller: list[pytest.Config] = []


def _write_line(line: str) -> None:
    terminal = _controller[-1].pluginmanager.get_plugin("terminalreporter") if _controller else None
    if terminal is not None:
        terminal.write_line("")
        terminal.write_line(line)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A fault test's `FAULT …` line, back from a worker with its teardown report."""
    if getattr(report, "node", None) is not None and report.when == "teardown":
        for name, value in report.user_properties:
            if name == FAULT_LINES:
                _write_line(str(value))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A worker's `FAULT harness …` lines (its private servers' boot times, written as its
    session fixtures end), back with its last words."""
    for line in (getattr(node, "workeroutput", None) or {}).get(FAULT_LINES, ()):
        _write_line(str(line))
