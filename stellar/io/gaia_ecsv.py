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
    """A parsed ECSV header: declared columns, the meta block, column names and where the data start."""

    columns: list[dict]
    meta: dict
    names: list[str]
    data_offset: int  # uncompressed byte offset of the first data line
    n_header_lines: int  # lines before the first data line (YAML header + the names line)

    def datatype(self, name: str) -> tuple[str, str | None]:
        """(datatype, subtype) declared for column ``name``; KeyError when it is not declared."""
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
    # data lines in this chunk's range after undecodable damage: estimated from the bytes that could
    # not be decoded (GzipDamage.remaining) over the mean length of the lines read before it
    lost_lines: int = 0
    corrupt: bool = False  # the whole stream decoded but fails its checksum: no line can be trusted
    note: str | None = None  # something worth saying that lost nothing (trailing bytes after the stream)


class HeaderError(ValueError):
    """An ECSV header that is missing, not valid YAML, disagrees with its names line, or lacks what the
    product needs: none of the file's rows can be trusted."""
    pass


def is_gzip(path: str | Path) -> bool:
    """Whether a file starts with the gzip magic bytes (the content decides, not the name)."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class GzipDamage(EOFError):
    """The gzip stream cannot be decoded past ``at`` (uncompressed bytes delivered before it).

    ``remaining`` estimates the uncompressed bytes that were in the file after the damage (from the
    gzip trailer's ISIZE where it is believable, else the compression ratio so far): what a reader
    counts as lost rows. ``corrupt`` means everything was decoded but the member's CRC-32 or size
    does not match its trailer, so some content is wrong and nowhere can be trusted.
    """

    def __init__(self, message: str, at: int, remaining: int = 0, corrupt: bool = False):
        super().__init__(message)
        self.at, self.remaining, self.corrupt = at, remaining, corrupt


_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 2, 4, 8, 16


def _gzip_header_length(buf: bytes) -> int | None:
    """Length of the gzip member header at the start of ``buf`` (RFC 1952); None if ``buf`` holds
    only part of it. Raises ValueError for a header that is not gzip/deflate."""
    if len(buf) < 10:
        return None
    if buf[:2] != b"\x1f\x8b" or buf[2] != 8:
        raise ValueError("not a gzip member header")
    flags, n = buf[3], 10
    if flags & _FEXTRA:
        if len(buf) < n + 2:
            return None
        n += 2 + struct.unpack("<H", buf[n:n + 2])[0]
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            end = buf.find(b"\0", n)
            if end < 0:
                return None
            n = end + 1
    if flags & _FHCRC:
        n += 2
    return n if len(buf) >= n else None


def _header_or_bad(buf: bytes) -> int | None:
    """``_gzip_header_length``, with -1 for bytes that are not a member header."""
    try:
        return _gzip_header_length(buf)
    except ValueError:
        return -1


class _GzipStream:
    """Decompressing reader that keeps every byte before damage, decompressing ahead in a thread.

    ``igzip.open().read(n)`` discards the data of a call that hits a damaged stream; decoding the
    raw deflate data of each member ourselves (and checking its CRC-32 and size against the trailer
    ourselves) returns everything up to the damage and only then raises ``GzipDamage``, with what
    is known about the rest. Decompression (ISA-L, which releases the GIL) runs in a read-ahead
    thread so it overlaps with parsing. Multi-member files are read through; bytes after the last
    member that are not another member (zero padding from a copy tool, garbage) are not data: they
    are reported in ``trailing`` and the stream ends cleanly.
    """

    _AHEAD = 8  # decompressed pieces buffered ahead (~1-4 MB each)
    _READ = 1 << 20

    def __init__(self, path: str | Path):
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf (compacted lazily: no memmove per read)
        self._eof = False
        self._error: BaseException | None = None
        self.trailing: tuple[int, bool] | None = None  # (bytes after the last member, all zero)
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
                self._members(raw, Path(path).stat().st_size)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there after the good data
            self._put(exc)

    def _members(self, raw, file_size: int) -> None:
        pending = b""  # compressed bytes read but not yet consumed
        consumed = 0  # compressed bytes consumed before ``pending``
        delivered = 0  # uncompressed bytes handed on
        members = 0

        def lost(at_comp: int) -> int:
            """Uncompressed bytes after compressed offset ``at_comp``, estimated."""
            rest = max(0, file_size - at_comp)
            ratio = delivered / max(1, at_comp)
            guess = int(rest * max(ratio, 1.0))
            try:
                with open(raw.name, "rb") as fh:
                    fh.seek(-4, 2)
                    isize = struct.unpack("<I", fh.read(4))[0]
            except OSError:
                return guess
            total = isize
            while total < delivered:  # ISIZE is the size mod 2**32
                total += 1 << 32
            left = total - delivered
            # believable: no more than the compressed rest could hold at ~1000:1 (deflate's limit)
            return left if left <= 1032 * rest + 1024 else guess

        while not self._stop.is_set():
            while (n := _header_or_bad(pending)) is None:
                more = raw.read(self._READ)
                if not more:
                    break
                pending += more
            if not pending:
                if members == 0:
                    raise GzipDamage("empty gzip file", 0)
                self._put(None)
                return
            if n is None or n < 0:
                if members == 0:
                    raise GzipDamage("not a gzip stream", 0, lost(0))
                rest = len(pending)
                zero = not pending.strip(b"\0")
                for more in iter(lambda: raw.read(self._READ), b""):
                    rest += len(more)
                    zero = zero and not more.strip(b"\0")
                self.trailing = (rest, zero)
                self._put(None)
                return
            consumed += n
            pending = pending[n:]
            member_start = consumed
            dec = isal_zlib.decompressobj(wbits=-15)  # raw deflate: the trailer is checked here, below
            crc, size = 0, 0
            while not dec.eof:
                if self._stop.is_set():
                    return
                if not pending:
                    pending = raw.read(self._READ)
                    if not pending:
                        raise GzipDamage("compressed file ended before the end-of-stream marker was reached",
                                         delivered)
                try:
                    out = dec.decompress(pending)
                except isal_zlib.error as exc:
                    extra, at_comp = self._salvage(raw.name, member_start, size)
                    delivered += extra
                    raise GzipDamage(f"corrupt deflate data in gzip member {members + 1} ({exc})", delivered,
                                     lost(at_comp)) from None
                used = len(pending) - (len(dec.unused_data) if dec.eof else 0)
                consumed += used
                pending = dec.unused_data if dec.eof else b""
                if out:
                    crc = isal_zlib.crc32(out, crc)
                    size += len(out)
                    delivered += len(out)
                    if not self._put(out):
                        return
            while len(pending) < 8:
                more = raw.read(self._READ)
                if not more:
                    raise GzipDamage("file ends inside a gzip member's trailer", delivered)
                pending += more
            want_crc, want_size = struct.unpack("<II", pending[:8])
            if want_crc != crc or want_size != size & 0xFFFFFFFF:
                raise GzipDamage(f"gzip member {members + 1} fails its CRC-32/size check (content corrupt)",
                                 delivered, corrupt=True)
            pending = pending[8:]
            consumed += 8
            members += 1

    def _salvage(self, path: str, member_start: int, done: int) -> tuple[int, int]:
        """Decode the damaged member again in small steps (stdlib zlib, error path only) to hand on
        what lies between the last good piece and the damage; returns (bytes handed on, compressed
        offset of the damage)."""
        import zlib

        dec = zlib.decompressobj(wbits=-15)
        seen = handed = 0
        at = member_start
        with open(path, "rb") as fh:
            fh.seek(member_start)
            for piece in iter(lambda: fh.read(512), b""):
                try:
                    out = dec.decompress(piece)
                except zlib.error:
                    break
                at += len(piece)
                if seen + len(out) > done:
                    new = out[max(0, done - seen):]
                    if not self._put(new):
                        break
                    handed += len(new)
                seen += len(out)
                if dec.eof:
                    break
        return handed, at

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
        """Up to ``n`` bytes (all that is left when n < 0); the damage is raised once the bytes before it
        are read."""
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
        """The next line with its newline (the last may lack one); b'' at the end."""
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


def open_file(path: str | Path):
    """A binary reader of a plain or gzip file (gzip: decompressed ahead in a thread, damage kept
    apart from the good bytes before it; see ``_GzipStream``)."""
    return _GzipStream(path) if is_gzip(path) else open(path, "rb")


def uncompressed_size_hint(path: str | Path) -> int:
    """Uncompressed size for planning: gzip ISIZE (mod 2**32), or the file size.

    Only a hint (it sizes chunks, it never decides what is read): a trailer that cannot be the real
    one (zero padding or garbage after the stream, where the last four bytes are not ISIZE) would
    split a small file into many tasks, so an ISIZE below the file size or above 64 times it (Gaia's
    number text compresses 2-5:1) falls back to a typical text ratio.
    """
    size = Path(path).stat().st_size
    if not is_gzip(path) or size < 18:
        return size
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        isize = struct.unpack("<I", fh.read(4))[0]
    # ISIZE wraps at 4 GiB: the real size is ISIZE + k * 2**32, at least the file size.
    while isize < size:
        isize += 1 << 32
    return isize if isize <= 64 * size else 4 * size


UTF8_BOM = b"\xef\xbb\xbf"


def read_header(path: str | Path) -> EcsvHeader:
    """The ECSV header. A UTF-8 byte-order mark before ``# %ECSV`` (editors on some systems write
    one) is skipped; the data offset still counts its bytes."""
    lines: list[bytes] = []
    offset = 0
    with open_file(path) as fh:
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
    damage: str | None = None
    lost = 0
    corrupt = False
    note = None
    try:
        with open_file(path) as fh:
            try:
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
            finally:
                trailing = getattr(fh, "trailing", None)
        if trailing:
            n_bytes, zero = trailing
            note = (f"{n_bytes} {'zero bytes' if zero else 'bytes of trailing garbage'} after the gzip stream "
                    "ignored (not data; every member before them passed its CRC check)")
    except GzipDamage as exc:
        damage = f"gzip stream damaged: {exc}"
        corrupt = exc.corrupt
        if exc.remaining:  # the part of the undecodable rest that lies in this chunk's byte range
            lo, hi = max(exc.at, start), exc.at + exc.remaining if end is None else min(exc.at + exc.remaining, end)
            seen = line - 1 - header.n_header_lines  # data lines decoded, here or while skipping to `start`
            mean = (pos - len(carry) - header.data_offset) / seen if seen > 0 else 0.0
            if hi > lo:  # the incomplete line before the damage is one row already (quarantined as such)
                lost = max(0 if carry else 1, round((hi - lo + len(carry)) / mean) - bool(carry)) if mean > 0 \
                    else int(not carry)
    except (EOFError, OSError, ValueError) as exc:
        damage = f"gzip stream damaged: {exc}"
    if carry or damage or note:
        partial = carry or None
        if damage is None and carry:
            damage = "file does not end with a newline"
        yield Chunk(b"", line, 0, damage, partial, lost, corrupt, note)


def _unbalanced_quotes(data: bytes | bytearray, first_line: int) -> tuple[bytes, np.ndarray, list[tuple[int, str]], list[str]]:
    """Make every row one line again when quotes do not pair up within lines (slow path, damage only).

    A CSV parser carries an open quote across a newline, so one stray quote would swallow the lines
    after it. Here each line stands alone: a line with an odd number of quotes followed by another
    is one row cut by a newline inside a quoted value (the newline becomes a space and the two lines
    are read as that row, at the first line's number); any other line with an odd count is a bad
    line on its own. Returns (clean data, line number of each clean line, bad lines, notes).
    """
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)  # data ends with a newline: one end per line
    quotes = np.flatnonzero(buf == 34)
    odd = np.bincount(np.searchsorted(ends, quotes), minlength=len(ends))[: len(ends)] % 2 == 1
    joined = np.zeros(len(ends), dtype=bool)  # line i's newline is inside a quoted value
    i = 0
    idx = np.flatnonzero(odd)
    pairs = []
    while i < len(idx):  # loop over the few broken lines only
        if i + 1 < len(idx) and idx[i + 1] == idx[i] + 1:
            pairs.append(idx[i])
            i += 2
        else:
            i += 1
    joined[pairs] = True
    absorbed = np.zeros(len(ends), dtype=bool)
    absorbed[np.asarray(pairs, dtype=np.int64) + 1] = True
    stray = odd & ~joined & ~absorbed
    out = buf.copy()
    out[ends[joined]] = 32
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep = ~stray
    pieces = [out[lo:hi + 1] for lo, hi in zip(starts[keep & ~absorbed], ends[keep & ~joined])]
    numbers = first_line + np.flatnonzero(keep & ~absorbed)
    bad = [(first_line + int(k), "unbalanced quotes: a quoted value is cut by a newline")
           for k in np.flatnonzero(stray)]
    notes = [f"line {first_line + int(k)}: a quoted value continued on the next line (a newline inside quotes); "
             "the two lines were read as one row" for k in pairs]
    return (b"".join(p.tobytes() for p in pieces), numbers.astype(np.int64), bad, notes)


def parse_text_table(chunk: Chunk, names: list[str], include: list[str]) -> tuple[pa.Table, np.ndarray, list[tuple[int, str]], list[str]]:
    """CSV text -> table of string columns; returns (table, line numbers of its rows, bad lines, notes).

    A line with the wrong number of fields is skipped by the parser and reported. A row is one
    line (the archive writes no newline inside a value); where quotes say otherwise, the chunk is
    read again line by line (``_unbalanced_quotes``). Rows plus bad lines are the chunk's rows:
    fewer than its lines where a row was cut by a newline.
    """
    if chunk.n_lines == 0:
        empty = pa.table({n: pa.array([], pa.string()) for n in include})
        return empty, np.zeros(0, dtype=np.int64), [], []
    lines = np.arange(chunk.first_line, chunk.first_line + chunk.n_lines, dtype=np.int64)
    data, not_utf8 = chunk.data, {}
    if not data.isascii():  # the archive writes ASCII (a fast check): only damaged text is decoded
        data, not_utf8 = _invalid_utf8_lines(data, chunk.first_line)
    try:
        table, bad = _read_csv_lines(data, chunk.first_line, names, include)
    except pa.ArrowInvalid:  # e.g. a quote left open at the end of the chunk
        table, bad = None, []
    if table is not None:
        good = np.setdiff1d(lines, np.array([ln for ln, _ in bad], dtype=np.int64)) if bad else lines
        if len(good) == table.num_rows:
            return (*_give_up_lines(table, good, bad, not_utf8), [])
    data, numbers, stray, notes = _unbalanced_quotes(data, chunk.first_line)
    # line numbers of the clean data map back through ``numbers`` (its k-th line is numbers[k])
    table, bad = _read_csv_lines(data, 1, names, include)
    bad = [(int(numbers[ln - 1]), why) for ln, why in bad]
    good = np.setdiff1d(numbers, np.array([ln for ln, _ in bad], dtype=np.int64)) if bad else numbers
    if len(good) != table.num_rows:
        raise RuntimeError(f"line accounting failed: {len(good)} lines vs {table.num_rows} rows")
    return (*_give_up_lines(table, good, sorted(bad + stray), not_utf8), notes)


def _give_up_lines(table: pa.Table, good: np.ndarray, bad: list[tuple[int, str]], damaged: dict[int, str]
                   ) -> tuple[pa.Table, np.ndarray, list[tuple[int, str]]]:
    """Make the row (or bad line) that each ``damaged`` line belongs to a bad line with that reason, and
    only that one: a row is dropped from ``table``/``good``, a bad line's reason is replaced."""
    if not damaged:
        return table, good, bad
    starts = np.sort(np.concatenate([good, np.array([ln for ln, _ in bad], dtype=np.int64)]))
    owner = {int(starts[max(0, np.searchsorted(starts, ln, side="right") - 1)]): why for ln, why in damaged.items()}
    drop = np.isin(good, np.array(sorted(owner), dtype=np.int64))
    bad = [(ln, why) for ln, why in bad if ln not in owner] + sorted(owner.items())
    return table.filter(pa.array(~drop)), good[~drop], sorted(bad)


def _invalid_utf8_lines(data: bytes | bytearray, first_line: int) -> tuple[bytes | bytearray, dict[int, str]]:
    """``data`` with every byte sequence that is not UTF-8 replaced (U+FFFD), and the line numbers of the
    lines that held one. The archive writes ASCII; one such byte (a disk or transfer error) would make the
    CSV parser refuse the whole chunk, so only its line is given up. Runs only on text that is not ASCII."""
    raw = bytes(data)
    try:
        raw.decode("utf-8")
        return data, {}
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    damaged = {first_line + i: "not UTF-8 text: a byte the archive never writes (damaged line)"
               for i, line in enumerate(text.split("\n")) if "\ufffd" in line}
    return text.encode("utf-8"), damaged


def _read_csv_lines(data, first_line: int, names: list[str], include: list[str]) -> tuple[pa.Table, list[tuple[int, str]]]:
    bad: list[tuple[int, str]] = []

    def on_invalid(row):
        number = row.number if row.number is not None else -1
        text = (row.text or "")[:120]
        bad.append((first_line + number - 1, f"wrong number of fields ({row.actual_columns} for "
                                             f"{row.expected_columns}): {text!r}"))
        return "skip"

    table = pacsv.read_csv(
        pa.BufferReader(pa.py_buffer(data)),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=64 << 20),
        parse_options=pacsv.ParseOptions(delimiter=",", quote_char='"', ignore_empty_lines=False,
                                         newlines_in_values=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             include_columns=include, strings_can_be_null=False,
                                             quoted_strings_can_be_null=False),
    )
    return table, bad
