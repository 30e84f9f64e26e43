"""TensorBoard event files cut back to a step, for a resumed run (`truncate_event_file`).

An event file is a TFRecord file of serialized `Event` protos. Each record is
  uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)
(little-endian). Records are copied verbatim, so only the checksums of what is read are
computed, with numpy: tensorboard's pure-Python crc32c does ~2 MB/s, and a long run's
event file is tens of MB. No TensorFlow code runs here.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
from etils import epath
from google.protobuf import message
from tensorboard.compat.proto import event_pb2

EVENT_FILE_PATTERN = "events.out.tfevents.*"
# Not matching "*tfevents*", which TensorBoard loads: a temporary left by a kill is ignored
# by it (and overwritten by the next truncation).
_EVENT_TEMPORARY = ".event_file_rewrite.tmp"
_CRC_CHUNK = 1024  # bytes a vectorised CRC pass handles per record before chunks combine
_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8


@functools.lru_cache(maxsize=None)
def _crc32c_tables() -> tuple[np.ndarray, np.ndarray]:
  """The byte table of CRC-32C, and the (4, 256) tables of the linear map "feed
  _CRC_CHUNK zero bytes" applied to each byte of the register."""
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
  zeros = (np.arange(256, dtype=np.uint32)[None, :]
           << (8 * np.arange(4, dtype=np.uint32))[:, None]).reshape(-1)
  for _ in range(_CRC_CHUNK):
    zeros = table[zeros & 0xFF] ^ (zeros >> 8)
  return table, zeros.reshape(4, 256)


def _crc_registers(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                   registers: np.ndarray) -> np.ndarray:
  """The CRC-32C registers after feeding each slice data[start:start+length] into the
  matching register: one numpy pass per byte position, over all slices at once."""
  table, _ = _crc32c_tables()
  order = np.argsort(-lengths, kind="stable")  # longest first: the live ones are a prefix
  starts, lengths, registers = starts[order], lengths[order], registers[order].copy()
  longest = int(lengths[0]) if len(lengths) else 0
  live = np.searchsorted(-lengths, -np.arange(longest), side="left")  # count with length > i
  for i in range(longest):
    k = live[i]
    register = registers[:k]
    registers[:k] = table[(register ^ data[starts[:k] + i]) & 0xFF] ^ (register >> 8)
  out = np.empty_like(registers)
  out[order] = registers
  return out


def _masked_crc32c(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """TFRecord's masked CRC-32C of each slice data[start:start+length] (uint8 `data`).

  CRC registers are linear over GF(2): feeding a chunk into register r gives
  feed(r, zeros) ^ feed(0, chunk). So a slice is cut into a head and whole _CRC_CHUNK
  chunks, all of which are fed in one vectorised pass, and then combined in order with
  the precomputed "feed _CRC_CHUNK zeros" map; no Python loop runs per byte of a long
  record.
  """
  _, zeros = _crc32c_tables()
  starts = np.asarray(starts, dtype=np.int64)
  lengths = np.asarray(lengths, dtype=np.int64)
  chunks = np.maximum(lengths - 1, 0) // _CRC_CHUNK  # whole chunks after the head
  heads = lengths - chunks * _CRC_CHUNK
  registers = _crc_registers(data, starts, heads, np.full(len(starts), 0xFFFFFFFF, np.uint32))
  if chunks.any():
    owner = np.repeat(np.arange(len(starts)), chunks)
    first = np.cumsum(chunks) - chunks  # index of each slice's first chunk
    index = np.arange(len(owner)) - first[owner]
    chunk_starts = starts[owner] + heads[owner] + index * _CRC_CHUNK
    fed = _crc_registers(data, chunk_starts, np.full(len(owner), _CRC_CHUNK, np.int64),
                         np.zeros(len(owner), np.uint32))
    long = np.nonzero(chunks)[0]
    long = long[np.argsort(-chunks[long], kind="stable")]
    live = np.searchsorted(-chunks[long], -np.arange(int(chunks[long[0]])), side="left")
    for j, k in enumerate(live):
      rows = long[:k]
      r = registers[rows]
      registers[rows] = (zeros[0][r & 0xFF] ^ zeros[1][(r >> 8) & 0xFF]
                         ^ zeros[2][(r >> 16) & 0xFF] ^ zeros[3][r >> 24] ^ fed[first[rows] + j])
  crc = (registers ^ np.uint32(0xFFFFFFFF)).astype(np.uint64)
  return ((((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


def _event_records(data: bytes) -> tuple[list[tuple[int, int]], bool]:
  """The (start, end) byte ranges of the intact records at the head of a TFRecord file,
  and whether the whole file is intact.

  Reading stops at the first record that is cut short (a kill mid-write) or fails either
  checksum (garbage, or a zero-filled tail after a crash): the records before it are the
  good ones, and what follows a broken length cannot be framed anyway.
  """
  spans, offset = [], 0
  while len(data) - offset >= 12:
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + 12 + length + 4
    if end > len(data):
      break
    spans.append((offset, end))
    offset = end
  if spans:
    buffer = np.frombuffer(data, dtype=np.uint8)
    starts = np.array([start for start, _ in spans], dtype=np.int64)
    ends = np.array([end for _, end in spans], dtype=np.int64)
    stored = buffer[np.concatenate([starts + 8, ends - 4])[:, None] + np.arange(4)]
    stored = stored.astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
    computed = _masked_crc32c(buffer, np.concatenate([starts, starts + 12]),
                              np.concatenate([np.full(len(spans), 8), ends - starts - 16]))
    ok = (stored[:len(spans)] == computed[:len(spans)]) & (
        stored[len(spans):] == computed[len(spans):])
    if not ok.all():
      spans = spans[:int(np.argmin(ok))]
  intact = (spans[-1][1] == len(data)) if spans else not data
  return spans, intact


def truncate_event_file(path: epath.Path, step: int) -> None:
  """Rewrites one event file without its events of steps > `step` and without a damaged
  tail; leaves it untouched when there is nothing to drop.

  Events without a step (file_version and the like: step 0) are kept. A record that is
  intact but not an Event proto has no step to judge, and is kept as it is.
  """
  data = path.read_bytes()
  spans, intact = _event_records(data)
  kept = []
  for start, end in spans:
    try:
      event_step = event_pb2.Event.FromString(data[start + 12:end - 4]).step
    except message.DecodeError:
      event_step = step
    if event_step <= step:
      kept.append((start, end))
  if intact and len(kept) == len(spans):
    return
  temporary = path.parent / _EVENT_TEMPORARY
  temporary.write_bytes(b"".join(data[start:end] for start, end in kept))
  temporary.replace(path)  # whole file or old file, never half of one
