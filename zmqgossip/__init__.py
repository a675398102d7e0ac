"""zmqgossip: asynchronous peer-to-peer personalized learning (DAC) over ZeroMQ."""

__version__ = "0.1.0"
