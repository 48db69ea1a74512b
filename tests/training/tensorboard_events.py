"""Reads TensorBoard event files back without TensorBoard (which CI does not install).

An event file is a TFRecord stream: for each record, its length (uint64, little-endian), the
masked CRC-32C of those 8 bytes, the payload (an ``Event`` protobuf), the masked CRC-32C of the
payload. The framing and checksums are checked here with an implementation of our own; only the
protobuf class comes from tensorboardX.
"""

from __future__ import annotations

import glob
import os
import struct


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):  # reflected Castagnoli polynomial
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory) -> list:
    """Every ``Event`` of every event file in ``directory``, files in name (creation) order."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(glob.glob(os.path.join(str(directory), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert header_crc == _masked(_crc32c(header)), f"bad length checksum in {path}"
            assert payload_crc == _masked(_crc32c(payload)), f"bad record checksum in {path}"
            events.append(Event.FromString(payload))
            pos += 16 + length
    return events


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of the scalar summaries in ``directory``'s event files."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(directory):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
