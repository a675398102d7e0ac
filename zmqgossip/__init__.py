"""zmqgossip: asynchronous peer-to-peer personalized learning (DAC) over ZeroMQ."""

import os

# Tensors of 2 MB and more (large models, their snapshots) on transparent huge pages:
# copying and checking a 10 MB model is ~10% faster with far fewer TLB misses. torch reads
# this once, at its first allocation, so it only takes effect when zmqgossip is imported
# before torch (the CLI, its workers and the benchmarks are); a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
