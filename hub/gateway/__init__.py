"""The gateway: the hub's API layer for clients that do not speak ZeroMQ.

It is just another SDK client. One ``AsyncHubClient`` carries every request to the
supervisor, and this package only maps protocols onto it:

- ``openai_api``: OpenAI-compatible ``/v1/audio/transcriptions``, ``/translations``, ``/v1/models``;
- ``live``: the ``/v1/stream`` WebSocket for live sessions, and ``static/index.html``, the page that uses it;
- ``realtime``: OpenAI's Realtime API, transcription sessions (``/v1/realtime``), over live sessions;
  ``realtime_events`` is its protocol without I/O;
- ``sockets``: what the two WebSocket endpoints share;
- ``wyoming_asr``: the Wyoming protocol (Home Assistant) over TCP;
- ``errors``: the one table from hub error codes to HTTP statuses, OpenAI error JSON and close codes.

Run it with ``python -m hub.gateway`` (standalone), or let the supervisor start it from the
config's ``gateway:`` section. Nothing here imports the supervisor side.
"""
