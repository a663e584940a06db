"""ASR Hub: a multiprocess worker farm serving speech recognition over ZeroMQ."""

__version__ = "0.1.0"
