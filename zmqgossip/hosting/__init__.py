"""One hosting path for every kind of run.

==================  ==============================================================
``build``           peers from a config: partition, models, policies, transports
``liveness``        who is up, who finished, who is gone (pings, give-up rules)
``scenario``        kill / partition / heal / join / rejoin, at their times or rounds
``schedules``       async (no barrier) and sequential (the reference code's rounds)
``host``            the one host loop every worker runs for its share of the peers
``workers``         spawned worker processes, started and watched
``places``          where workers run: tasks, processes, roster hosts
``cluster``         where workers run: actors of a Ray cluster (``RayActors``; optional)
``mirror``          a worker's run files copied to the driver's run directory
``endpoints``       what a run's endpoints leave behind, removed
``runs``            a run from its directory to its summary
==================  ==============================================================
"""

from .build import Hosted, build_partition, build_peers, check_model, make_shift, model_name, peer_settings, transport_config
from .host import host_peers
from .places import Place, Processes, RosterHosts, Tasks, default_place, worker_main
from .runs import load_run_config, prepare_run, run_experiment
from .scenario import EventHook, Scenario, late_joiners
from .workers import SpawnedWorkers, split_peers

__all__ = [
    "EventHook", "Hosted", "Place", "Processes", "RosterHosts", "Scenario", "SpawnedWorkers", "Tasks",
    "build_partition", "build_peers", "check_model", "default_place", "host_peers", "late_joiners",
    "load_run_config", "make_shift", "model_name", "peer_settings", "prepare_run", "run_experiment",
    "split_peers", "transport_config", "worker_main",
]
