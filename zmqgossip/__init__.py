"""zmqgossip: asynchronous peer-to-peer personalized learning (DAC) over ZeroMQ.

Importing the package has no side effects: the process's memory settings are tuned only
where peers are hosted (see ``allocator.tune_for_hosting``).
"""

__version__ = "0.1.0"
