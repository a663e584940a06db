"""The client side of the wire: everything a client process imports, and nothing of the supervisor.

``HubClient`` (blocking, thread-safe, ``hub.client.sync``) and ``AsyncHubClient`` (asyncio, ``hub.client.aio``) are
two transports over one sans-IO core (``hub.client.call``: the request protocol; ``hub.client.core``: what both
clients know; ``hub.client.session``: live sessions); ``HubPool``/``AsyncHubPool`` (``hub.client.balance``) spread
requests over many hubs; ``python -m hub.client`` is the command line (``hub.client.__main__``).
"""

from hub.client.aio import AsyncHubClient, AsyncTranscriptStream
from hub.client.balance import AsyncHubPool, HubPool
from hub.client.call import CurveKeys
from hub.client.core import DEFAULT_ENDPOINT
from hub.client.session import AsyncStreamSession, StreamEvent, StreamSession
from hub.client.sync import HubClient, TranscriptStream
from hub.results import Segment, Transcript

__all__ = [
    "DEFAULT_ENDPOINT",
    "AsyncHubClient",
    "AsyncHubPool",
    "AsyncStreamSession",
    "AsyncTranscriptStream",
    "CurveKeys",
    "HubClient",
    "HubPool",
    "Segment",
    "StreamEvent",
    "StreamSession",
    "Transcript",
    "TranscriptStream",
]
