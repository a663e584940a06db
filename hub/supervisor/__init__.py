"""The supervisor side of the wire: what only the supervisor process imports.

``loop`` (the poll loop: sockets, signals, timers, the clock), ``farm`` (one-shot jobs and queues), ``jobs`` (a job's
kinds, states and table), ``admission`` (checks before a job exists), ``assignment`` (which worker takes a job or a
session), ``workforce`` (the workers' life cycle), ``pool`` (worker handles and states), ``process`` (starting and
stopping worker processes), ``scaling`` (the pool-size policy), ``gpus`` and ``cards`` (GPUs, which card a worker
gets, NVML readings), ``metrics``, ``sketch`` and ``views`` (figures, status and Prometheus), ``probes`` (the
``/healthz`` ``/readyz`` ``/metrics`` server), ``gateway_child`` (the gateway run as a child), ``release`` (routes
and rollout: gray releases). ``python -m hub.supervisor`` runs it. Nothing here is imported by ``hub.client``,
``hub.gateway`` or ``workers``.
"""
