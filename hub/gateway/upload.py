"""Read a multipart/form-data body into memory as it streams in, within a byte limit.

Starlette's own form parser spools large files to a temporary file; an upload here is held in
memory only, once (the file part's bytes are kept as they were collected, not copied), and a body
over the limit is refused while it streams (or at once, from its Content-Length), before it is all read.
A body without a Content-Length (chunked) reports its size as it is read (``on_read``), so that the
caller can hold it to a memory budget as it grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from hub.gateway.errors import ApiError

MAX_PARTS = 64
MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Form:
    fields: dict[str, tuple[str, ...]]
    files: dict[str, tuple[str, bytearray]]  # name -> (filename, content)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def all(self, name: str) -> tuple[str, ...]:
        return self.fields.get(name, ())


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)


def too_large(limit: int) -> ApiError:
    return ApiError(
        "UPLOAD_TOO_LARGE",
        f"the upload is larger than this gateway accepts ({limit / 2**20:.0f} MB, gateway.max_upload_mb); "
        "send a shorter or more compressed file",
        param="file",
    )


def declared_length(content_length: str | None, limit: int) -> int | None:
    """The body's size from its Content-Length (None for a chunked body); 413 at once for one over ``limit``."""
    if content_length is None or not content_length.isdigit():
        return None
    if int(content_length) > limit:
        raise too_large(limit)
    return int(content_length)


async def read_form(
    content_type: str,
    content_length: str | None,
    body: AsyncIterator[bytes],
    limit: int,
    on_read: Callable[[int], Awaitable[None]] | None = None,
    pause: float | None = None,
) -> Form:
    """Parse the body; raise ``ApiError`` (BAD_REQUEST, UPLOAD_TOO_LARGE) for anything wrong with it, and
    IDLE_TIMEOUT when no piece of it arrives for ``pause`` seconds (a stalled upload holds its memory budget).
    ``on_read(bytes so far)`` is awaited after each piece of a body that has no Content-Length."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError("BAD_REQUEST", "the body must be multipart/form-data (e.g. curl -F file=@clip.wav ...)")
    chunked = declared_length(content_length, limit) is None
    parts: list[_Part] = []

    def begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise ApiError("BAD_REQUEST", f"the form has more than {MAX_PARTS} parts")
        parts.append(_Part())

    def header_field(data: bytes, start: int, end: int) -> None:
        parts[-1].header_field += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        parts[-1].header_value += data[start:end]

    def header_end() -> None:
        part = parts[-1]
        if bytes(part.header_field).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(part.header_value))
            part.name = options.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in options:
                part.filename = options[b"filename"].decode("utf-8", "replace")
        part.header_field.clear()
        part.header_value.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data += data[start:end]
        if part.filename is None and len(part.data) > MAX_FIELD_BYTES:
            raise ApiError("BAD_REQUEST", f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": part_data,
        },
    )
    received = 0
    pieces = aiter(body)
    try:
        while (chunk := await _next(pieces, pause)) is not None:
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            if chunked and on_read is not None:
                await on_read(received)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError("BAD_REQUEST", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise ApiError("CLIENT_CLOSED", "the client closed the connection before its upload ended") from None
    if not parts or parser.state.name not in ("END", "END_BOUNDARY"):
        raise ApiError("BAD_REQUEST", "malformed multipart body: it ends before its closing boundary")
    fields: dict[str, tuple[str, ...]] = {}
    files: dict[str, tuple[str, bytearray]] = {}
    for part in parts:
        if part.filename is not None:
            files[part.name] = (part.filename, part.data)
        else:
            fields[part.name] = (*fields.get(part.name, ()), part.data.decode("utf-8", "replace"))
    return Form(fields, files)


async def _next(pieces: AsyncIterator[bytes], pause: float | None) -> bytes | None:
    """The body's next piece, None at its end."""
    try:
        return await asyncio.wait_for(anext(pieces), pause)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise ApiError(
            "IDLE_TIMEOUT", f"no part of the upload arrived for {pause:g} s (gateway.header_timeout)"
        ) from None
