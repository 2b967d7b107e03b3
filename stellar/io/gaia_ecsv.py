"""Read Gaia archive ECSV files (bulk gzip or plain) in line-aligned chunks, fast.

The YAML header is parsed once; the CSV body is parsed by pyarrow's CSV reader
with every column as text, then converted column by column with Arrow kernels
(stellar.io.text_parse), so a bad value costs its row, not the file. Large
files are split into chunks by uncompressed byte offset: a line belongs to the
chunk in which it starts, so chunks of one file can be parsed by different
tasks and together cover every line exactly once. A truncated or corrupt gzip
stream yields the complete lines before the damage plus a record of it.
"""

from __future__ import annotations

import queue
import threading
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import yaml
from isal import isal_zlib

READ_BLOCK = 4 << 20


@dataclass
class EcsvHeader:
    columns: list[dict]
    meta: dict
    names: list[str]
    data_offset: int  # uncompressed byte offset of the first data line
    n_header_lines: int  # lines before the first data line (YAML header + the names line)

    def datatype(self, name: str) -> tuple[str, str | None]:
        for c in self.columns:
            if c["name"] == name:
                return c.get("datatype", "string"), c.get("subtype")
        raise KeyError(name)


@dataclass
class Chunk:
    """The complete data lines of one chunk, with the absolute line number of the first."""

    data: bytes
    first_line: int  # 1-based line number in the file of the first line in ``data``
    n_lines: int
    damage: str | None = None  # set when the stream ended early / was corrupt
    partial_line: bytes | None = None  # the incomplete last line of a truncated stream


class HeaderError(ValueError):
    pass


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class _GzipStream:
    """Decompressing reader that keeps every byte before damage, decompressing ahead in a thread.

    ``igzip.open().read(n)`` discards the data of a call that hits a truncated
    stream; decompressing compressed blocks ourselves returns everything up to
    the damage and only then raises ``EOFError``. Decompression (ISA-L, which
    releases the GIL) runs in a read-ahead thread so it overlaps with parsing.
    Multi-member files are read through.
    """

    _AHEAD = 8  # decompressed pieces buffered ahead (~1-4 MB each)

    def __init__(self, path: str | Path):
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf (compacted lazily: no memmove per read)
        self._eof = False
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=self._AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(str(path),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, path: str) -> None:
        try:
            with open(path, "rb") as raw:
                dec = isal_zlib.decompressobj(wbits=31)
                while not self._stop.is_set():
                    comp = raw.read(1 << 20)
                    if not comp:
                        self._put(None if dec.eof else EOFError(
                            "compressed file ended before the end-of-stream marker was reached"))
                        return
                    while comp:
                        if dec.eof:  # next gzip member
                            dec = isal_zlib.decompressobj(wbits=31)
                        out = dec.decompress(comp)
                        comp = dec.unused_data if dec.eof else b""
                        if out and not self._put(out):
                            return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there after the good data
            self._put(exc)

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self, n: int) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        while self._avail() < n and not self._eof:
            item = self._queue.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                self._error = item
            else:
                self._buf += item
        if self._error is not None and not self._avail():
            raise self._error

    def read(self, n: int = -1) -> bytes:
        self._fill(n if n >= 0 else 1 << 62)
        n = self._avail() if n < 0 else min(n, self._avail())
        out = bytes(memoryview(self._buf)[self._pos : self._pos + n])
        self._pos += n
        return out

    def read_append(self, target: bytearray, n: int) -> int:
        """Append up to n bytes to ``target`` (one copy, no intermediate bytes object)."""
        self._fill(n)
        n = min(n, self._avail())
        target += memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        return n

    def readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                return self.read(i + 1 - self._pos)
            if self._eof:
                return self.read()
            before = self._avail()
            self._fill(before + (1 << 16))
            if self._avail() == before:
                return self.read()

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _open(path: str | Path):
    return _GzipStream(path) if is_gzip(path) else open(path, "rb")


def uncompressed_size_hint(path: str | Path) -> int:
    """Uncompressed size for planning: gzip ISIZE (mod 2**32), or the file size."""
    size = Path(path).stat().st_size
    if not is_gzip(path) or size < 18:
        return size
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        isize = struct.unpack("<I", fh.read(4))[0]
    # ISIZE wraps at 4 GiB; text compresses at least ~2x, so correct upwards when it wrapped.
    while isize < size:
        isize += 1 << 32
    return isize


UTF8_BOM = b"\xef\xbb\xbf"


def read_header(path: str | Path) -> EcsvHeader:
    """The ECSV header. A UTF-8 byte-order mark before ``# %ECSV`` (editors on some systems write
    one) is skipped; the data offset still counts its bytes."""
    lines: list[bytes] = []
    offset = 0
    with _open(path) as fh:
        for i, raw in enumerate(fh):
            offset += len(raw)
            if i == 0 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            if raw.startswith(b"#"):
                lines.append(raw)
                continue
            names_line = raw
            break
        else:
            raise HeaderError("no data section after the ECSV header")
    if not lines or not lines[0].startswith(b"# %ECSV"):
        raise HeaderError("not an ECSV file (first line is not '# %ECSV ...')")
    body = b"".join(ln[2:] if ln.startswith(b"# ") else ln[1:] for ln in lines[1:])
    try:
        doc = yaml.safe_load(body.decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HeaderError(f"ECSV header is not valid YAML: {exc}") from exc
    columns = doc.get("datatype") or []
    if not isinstance(columns, list) or not all(isinstance(c, dict) and "name" in c for c in columns):
        raise HeaderError("ECSV header has no valid 'datatype' column list")
    delimiter = doc.get("delimiter", " ")
    names = names_line.decode("utf-8").rstrip("\r\n").split(delimiter)
    declared = [c["name"] for c in columns]
    if names != declared:
        raise HeaderError(f"column names line does not match the header's datatype list "
                          f"({len(names)} names vs {len(declared)} declared)")
    meta = doc.get("meta") or {}
    return EcsvHeader(columns, meta if isinstance(meta, dict) else {"meta": meta}, names, offset, len(lines) + 1)


def iter_chunks(path: str | Path, header: EcsvHeader, start: int = 0, end: int | None = None,
                block_bytes: int = 16 << 20):
    """Yield line-aligned Chunks of about ``block_bytes`` covering the lines that start in [start, end).

    Memory stays bounded by the block size whatever the file size.
    """
    start = max(start, header.data_offset)
    pos = 0
    line = 1
    carry = b""  # an incomplete line carried to the next block
    damage = None
    try:
        with _open(path) as fh:
            last_byte = b"\n"
            while pos < start:  # skip to `start`, counting lines for absolute line numbers
                block = fh.read(min(READ_BLOCK, start - pos))
                if not block:
                    return
                line += block.count(b"\n")
                last_byte = block[-1:]
                pos += len(block)
            if start > header.data_offset and last_byte != b"\n":
                rest = fh.readline()  # the line in progress at `start` belongs to the previous chunk
                pos += len(rest)
                if not rest.endswith(b"\n"):
                    return
                line += 1
            while True:
                if end is not None and pos >= end:
                    if carry:  # finish the line that started before `end`
                        tail = fh.readline()
                        carry += tail
                        if not tail.endswith(b"\n"):
                            raise EOFError("file ends inside a line")
                    if carry:
                        yield Chunk(carry, line, carry.count(b"\n"))
                    return
                want = block_bytes if end is None else max(1, min(block_bytes, end - pos))
                data = bytearray(carry)
                if isinstance(fh, _GzipStream):
                    got = fh.read_append(data, want)
                else:
                    block = fh.read(want)
                    data += block
                    got = len(block)
                if not got:
                    break
                pos += got
                cut = data.rfind(b"\n") + 1
                carry = bytes(data[cut:])
                del data[cut:]  # truncating the end: no copy of the block
                if cut:
                    n = data.count(b"\n")
                    yield Chunk(data, line, n)
                    line += n
    except (EOFError, OSError, ValueError) as exc:
        damage = f"gzip stream damaged: {exc}"
    if carry or damage:
        partial = carry or None
        if damage is None:
            damage = "file does not end with a newline"
        yield Chunk(b"", line, 0, damage, partial)


def parse_text_table(chunk: Chunk, names: list[str], include: list[str]) -> tuple[pa.Table, np.ndarray, list[tuple[int, str]]]:
    """CSV text -> table of string columns; returns (table, line numbers of its rows, bad lines).

    A line with the wrong number of fields is skipped by the parser and reported.
    """
    bad: list[tuple[int, str]] = []

    def on_invalid(row):
        number = row.number if row.number is not None else -1
        text = (row.text or "")[:120]
        bad.append((chunk.first_line + number - 1, f"wrong number of fields ({row.actual_columns} for "
                                                    f"{row.expected_columns}): {text!r}"))
        return "skip"

    if chunk.n_lines == 0:
        empty = pa.table({n: pa.array([], pa.string()) for n in include})
        return empty, np.zeros(0, dtype=np.int64), bad
    table = pacsv.read_csv(
        pa.BufferReader(pa.py_buffer(chunk.data)),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=64 << 20),
        parse_options=pacsv.ParseOptions(delimiter=",", quote_char='"', ignore_empty_lines=False,
                                         newlines_in_values=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             include_columns=include, strings_can_be_null=False,
                                             quoted_strings_can_be_null=False),
    )
    lines = np.arange(chunk.first_line, chunk.first_line + chunk.n_lines, dtype=np.int64)
    if bad:
        lines = np.setdiff1d(lines, np.array([ln for ln, _ in bad], dtype=np.int64))
    if len(lines) != table.num_rows:
        raise RuntimeError(f"line accounting failed: {len(lines)} lines vs {table.num_rows} rows")
    return table, lines, bad
