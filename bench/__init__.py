"""``python -m bench``: the hub's throughput and latency against a single instance, direct
faster-whisper and the machine's ceiling, plus the hub's own overhead. See bench/README.md.

Nothing heavy is imported here: ``python -m bench.bare`` runs as a bare model process and
must set its thread counts before CTranslate2 is loaded.
"""
