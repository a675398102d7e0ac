"""zmqgossip: asynchronous peer-to-peer personalized learning (DAC) over ZeroMQ."""

from . import allocator

#: which memory settings took effect in this process (see allocator.py)
MEMORY = allocator.tune()

__version__ = "0.1.0"
