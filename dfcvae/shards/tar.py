"""Walking a tar stream: the members' names and byte ranges, with every header checked.

Python's tarfile costs more per member than decoding a raw image (docs/data.md has the figures
against webdataset's `tar_file_iterator`), so `tar_members` reads the stream in large pieces,
walks the 512-byte headers itself, checks each piece's header checksums in one numpy pass
before it hands out the piece's members, and never parses a member.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

READ_BYTES = 4 << 20  # per read of a shard: hundreds of members, and a segment that ends early stops soon
END_OF_ARCHIVE = bytes(512)


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, buffer, offset, size) of each regular member of a tar stream: its bytes are
    buffer[offset : offset + size]. ustar as dfcvae.shards.writer writes it; pax and GNU long-name
    records as webdataset's TarWriter and GNU tar write them. Raises ValueError, in words, at the
    first damage, after the members before it.
    """
    buffer, at_end = b"", False
    while True:
        piece = stream.read(READ_BYTES)
        buffer, at_end = buffer + piece, not piece
        members, walked, damage, ended = _walk_headers(buffer, at_end)
        for name, start, size in members:
            yield name, buffer, start, size
        if damage:
            raise ValueError(damage)
        if ended:
            return
        buffer = buffer[walked:]


def _walk_headers(buffer: bytes, at_end: bool) -> tuple[list[tuple[str, int, int]], int, str | None, bool]:
    """The whole members at the start of `buffer` -> (members as (name, offset, size), bytes
    walked, the damage in words or None, whether the end-of-archive block was reached).
    `at_end`: no more bytes will come, so a member cut short is damage rather than a reason to
    read on."""
    members: list[tuple[str, int, int, int]] = []  # (name, offset, size, header number)
    headers: list[int] = []  # header offsets
    offset, damage, ended = 0, None, False
    # A pax ("x") or GNU long-name ("L") record names the member after it (webdataset's TarWriter,
    # Python's tarfile and GNU tar write them); where its member is not here yet, the walk
    # stops before the record, so the next piece is walked from it again.
    pending: dict[str, str] = {}
    pending_from: int | None = None
    try:
        while True:
            header = buffer[offset : offset + 512]
            if header == END_OF_ARCHIVE:
                ended = True
                break
            following = offset + 512  # the next header, once this one's size is known
            if following <= len(buffer):
                headers.append(offset)
                kind = header[156:157]
                size = _octal(header[124:136])
                following += (size + 511) // 512 * 512
            if following > len(buffer):  # not all here: read on (its header is still checked)
                if at_end:
                    raise ValueError(
                        f"unexpected end of data, {following - len(buffer)} bytes short: the shard is truncated"
                    )
                break
            body = buffer[offset + 512 : offset + 512 + size]
            if kind in b"xL":
                pending_from = offset if pending_from is None else pending_from
                pending |= _pax_records(body) if kind == b"x" else {"path": body.split(b"\0", 1)[0].decode()}
            elif kind not in b"gK":  # a global pax record or a long link name: nothing a sample uses
                if kind in (b"0", b"\0"):
                    name = pending.get("path") or _ustar_name(header)
                    members.append((name, offset + 512, size, len(headers) - 1))
                pending, pending_from = {}, None
            offset = following
    except ValueError as e:
        damage = str(e)
    bad = _first_bad_checksum(buffer, headers)
    if bad is not None:  # nothing from a corrupt header on can be trusted, its own error included
        members = [m for m in members if m[3] < bad]
        damage = "bad tar header checksum: the shard is corrupt"
    walked = offset if pending_from is None or damage or ended else pending_from
    return [m[:3] for m in members], walked, damage, ended


def _ustar_name(header: bytes) -> str:
    """The member name of a ustar header: its prefix field (bytes 345-500), then the name field."""
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(body: bytes) -> dict[str, str]:
    """A pax extended header's "LEN key=value\\n" records; ValueError when malformed."""
    records, at = {}, 0
    while at < len(body) and body[at] != 0:
        space = body.find(b" ", at)
        if space <= at or not body[at:space].isdigit():
            raise ValueError("malformed pax header: the shard is corrupt")
        length = int(body[at:space])  # the record's whole length, its digits included
        record = body[space + 1 : at + length]
        if length <= space - at + 1 or at + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError("malformed pax header: the shard is corrupt")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        at += length
    return records


def _octal(field: bytes) -> int:
    """A tar number field: octal digits up to the first NUL, spaces around them allowed."""
    digits = field[:-1]  # usually zero-padded digits and a NUL
    if field[-1] != 0 or digits.strip(b"01234567"):
        digits = field.split(b"\0", 1)[0].strip(b" ")
        if digits.strip(b"01234567"):  # a sign, underscore or anything int() would take but tar does not
            raise ValueError(f"tar header field {field!r} is not a number: the shard is corrupt")
    return int(digits or b"0", 8)


def _first_bad_checksum(buffer: bytes, headers: list[int]) -> int | None:
    """Number of the first header whose checksum (its bytes' sum, the checksum field counted
    as spaces) is not the one its checksum field holds, or None."""
    if not headers:
        return None
    blocks = np.frombuffer(buffer, np.uint8, count=len(buffer) // 512 * 512).reshape(-1, 512)
    rows = blocks[np.asarray(headers) // 512].astype(np.int64)  # tar headers sit on 512-byte blocks
    sums = rows.sum(axis=1) - rows[:, 148:156].sum(axis=1) + 8 * 32
    # Fields as tar writes them (6 octal digits, NUL) are compared here, all at once; others one by one.
    written = (sums[:, None] >> np.arange(15, -1, -3)) % 8 + ord("0")
    ok = np.all(rows[:, 148:154] == written, axis=1) & (rows[:, 154] == 0)
    for i in np.flatnonzero(~ok):
        try:
            if _octal(buffer[headers[i] + 148 : headers[i] + 156]) == sums[i]:
                continue
        except ValueError:  # no number: a bad checksum
            pass
        return int(i)
    return None
