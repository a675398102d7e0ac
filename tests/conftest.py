"""Test tiers, and shared fixtures: a reaper for stray child processes, a fresh asyncio
ZeroMQ context, and ``run_async`` (run a coroutine to completion under a hard timeout).
Plain helper functions shared by test modules live in ``_helpers.py``.

Tests in this project use real sockets and real processes; nothing here mocks ZeroMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psutil
import pytest
import zmq
import zmq.asyncio

T = TypeVar("T")

pytest_plugins = ["leftovers"]

REAP_GRACE_S = 2.0


# ------------------------------------------------------------------ tiers

# Each test module's tier (the markers are registered in pyproject.toml), kept here so that
# test files carry no tier bookkeeping. `make test-fast` runs "not processes and not slow".
MODULE_TIERS: dict[str, str] = {
    "test_config": "unit",
    "test_data": "unit",
    "test_docs": "unit",
    "test_learning": "unit",
    "test_models": "unit",
    "test_policies": "unit",
    "test_compute": "unit",
    "test_run_dir": "unit",
    "test_scoring": "unit",
    "test_wire": "unit",
    "test_flat": "unit",
    "test_hostile": "sockets",
    "test_links": "sockets",
    "test_peer_loop": "sockets",
    "test_poisoned": "slow",
    "test_scale": "slow",
    "test_security": "sockets",
    "test_transport": "sockets",
    "test_report": "slow",
    "test_stress": "sockets",
    "test_allocator": "processes",
    "test_cli": "processes",
    "test_processes": "processes",
    "test_conftest": "processes",
    "test_resume": "processes",
    "test_benchmarks": "slow",
    "test_presets": "slow",
    "test_reference": "slow",
    "test_results": "slow",
    "test_wheel": "slow",
    "test_hosting": "sockets",
    "test_cluster": "processes",
    "test_cluster_input": "processes",
    "test_mirror": "unit",
    "test_dac_options": "unit",
    "test_limits": "processes",
    "test_sweep": "slow",
}
# Tests whose tier differs from their module's ("module::test function"): whole
# experiments run to the end are slow, tests that start a server or worker process are
# processes.
TEST_TIERS: dict[str, str] = {
    "test_hostile::test_flooded_peer_keeps_training_serving_and_counts_every_refusal": "slow",
    "test_hostile::test_a_flooder_runs_on_the_cpus_it_is_given": "processes",
    "test_learning::test_mlp_learns_digits": "slow",
    "test_links::test_a_late_joiner_catches_up": "slow",
    "test_links::test_killed_peers_stop_answering_and_the_rest_finish": "slow",
    "test_links::test_partition_stops_cross_group_pulls_until_healed": "slow",
    "test_links::test_dac_with_30_percent_loss_finishes_with_all_peers_done": "slow",
    "test_links::test_sequential_with_links_is_reproducible": "slow",
    "test_links::test_dac_label_shift_with_lognormal_latency_loss_and_slow_peers_still_clusters": "slow",
    "test_peer_loop::test_periodic_checkpoints_are_at_most_one_per_checkpoint_min_s": "slow",
    "test_peer_loop::test_async_slow_peer_finishes_and_its_models_are_stale": "slow",
    "test_peer_loop::test_sequential_same_seed_same_numbers": "slow",
    "test_peer_loop::test_async_peers_of_a_process_take_turns_to_pull_and_compute": "slow",
    "test_peer_loop::test_a_pull_waiting_on_the_network_lends_its_turn": "slow",
    "test_peer_loop::test_label_shift_dac_clusters_random_does_not": "slow",
    "test_peer_loop::test_dac_score_rows_favour_own_cluster": "slow",  # the same runs
    "test_peer_loop::test_run_directory_contents": "slow",  # the same runs
    "test_peer_loop::test_conflicting_tasks_dac_beats_random_and_local_near_oracle": "slow",
    "test_peer_loop::test_sigint_run_local_leaves_a_summarised_partial_run": "processes",
    "test_security::test_roster_with_curve_runs_to_completion_and_refuses_without_keys": "processes",
    "test_stress::test_processes_stress_completes_without_failures": "processes",
    "test_stress::test_impossible_peer_counts_fail_with_the_preflight_message": "processes",
    "test_stress::test_a_thousand_stress_peers_in_one_process": "slow",
    "test_stress::test_sweep_writes_csv_and_png": "slow",
    "test_transport::test_pull_across_processes_over_ipc_and_tcp_returns_the_exact_tensors": "processes",
    "test_transport::test_pull_from_killed_peer_fails_within_timeout_and_pool_stays_usable": "processes",
    "test_transport::test_thousand_peers_in_one_process_pull_without_failure_and_bounded_sockets": "slow",
    "test_conftest::test_every_test_module_has_a_tier_and_every_named_test_exists": "unit",
    "test_hosting::test_liveness_rules_name_their_phases": "unit",
    "test_dac_options::test_dac_plus_stops_pulling_a_peer_that_died": "slow",
    "test_hosting::test_workers_split_peers_contiguously": "unit",
    "test_limits::test_stress_with_a_thousand_peers_in_the_default_mode_completes_without_a_failed_pull": "slow",
}
TIERS = ("unit", "sockets", "processes", "slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier; a test that carries a tier marker itself keeps it."""
    unknown: set[str] = set()
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        module = item.path.stem
        name = getattr(item, "originalname", item.name)
        tier = TEST_TIERS.get(f"{module}::{name}") or MODULE_TIERS.get(module)
        if tier is None:
            unknown.add(module)
            tier = "processes"  # run by `make test`, kept out of the fast tier until placed
        item.add_marker(tier)
    for module in sorted(unknown):
        warnings.warn(pytest.PytestConfigWarning(
            f"{module} has no tier in tests/conftest.py MODULE_TIERS: run as 'processes'"), stacklevel=1)


# ------------------------------------------------------------------ child processes


#: Child processes a longer-lived fixture owns (a module's Ray cluster): kept between its
#: tests, and checked by that fixture when it ends.
FIXTURE_PIDS: set[int] = set()


def helper_pids() -> set[int]:
    """multiprocessing's own long-lived helpers (resource tracker, forkserver), and the
    processes of a fixture that outlives one test: keep them."""
    keep = set(FIXTURE_PIDS)
    try:
        from multiprocessing import resource_tracker

        pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if pid:
            keep.add(pid)
    except Exception:
        pass
    try:
        from multiprocessing import forkserver

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            keep.add(pid)
    except Exception:
        pass
    return keep


def reap_children(grace_s: float = REAP_GRACE_S) -> list[int]:
    """Terminate every child process of this one (but multiprocessing's own helpers), then
    kill what is still alive after ``grace_s``. Returns the pids it had to stop.

    multiprocessing children are stopped through their ``Process`` objects (so that those
    learn the exit status); other children (subprocess, os.fork) through psutil, which
    also reaps them.
    """
    keep = helper_pids()
    procs = [p for p in multiprocessing.active_children() if p.pid not in keep]  # also joins finished ones
    mp_pids = {p.pid for p in procs}
    others = []
    for child in psutil.Process().children():
        if child.pid in keep | mp_pids:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                child.wait(0)  # exited: only reap it
                continue
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            continue
        others.append(child)
    if not procs and not others:
        return []
    for p in procs:
        p.terminate()
    for child in others:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    _, alive = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return sorted(mp_pids | {c.pid for c in others})


# ------------------------------------------------------------------ asyncio / zmq


def run_async(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run ``coro`` in a fresh event loop; fail the test (not hang) after ``timeout`` s."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"test coroutine did not finish within {timeout}s")

    return asyncio.run(bounded())


@pytest.fixture(name="run_async")
def run_async_fixture() -> Callable[..., Any]:
    """``run_async(coro, timeout=30)`` as a fixture, so test modules need no imports from here."""
    return run_async


@pytest.fixture
def actx():
    """A fresh ``zmq.asyncio.Context`` per test, destroyed (sockets closed, LINGER 0) after."""
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def sctx():
    """A fresh synchronous ``zmq.Context`` per test, destroyed after."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Small tensors on a shared machine with few cores: extra torch threads only contend.
    (Runs set their own threads per process; this keeps in-process tests comparable.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
