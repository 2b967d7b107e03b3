"""Vectorised conversion of text columns (as read from Gaia CSV/ECSV) to typed Arrow arrays.

Every function takes a string array and returns ``(typed array, problems)``
where ``problems`` is a string array (null where the row is fine) naming
what is wrong with that row's value, so callers can quarantine exactly the
bad rows and keep the rest. Arrays are accepted as ``[v1,v2]`` or
``(v1, v2)``; missing values as empty, ``null`` or ``NaN``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NULL_TOKENS = ("", "null", "NULL", "None", "--")
_NUMBER = r"^[+-]?((\d+(\.\d*)?)|(\.\d+))([eE][+-]?\d+)?$|^[+-]?(nan|NaN|NAN|inf|Inf|INF|Infinity|infinity)$"
_INTEGER = r"^[+-]?\d+$"
_BOOL_TRUE = ("True", "true", "TRUE", "T", "1")
_BOOL_FALSE = ("False", "false", "FALSE", "F", "0")


def _token_in(text: pa.Array, tokens=NULL_TOKENS) -> pa.Array:
    """Membership in a few short tokens; chained equals are ~100x faster than is_in here."""
    out = pc.equal(text, tokens[0])
    for tok in tokens[1:]:
        out = pc.or_(out, pc.equal(text, tok))
    return out


def _is_null_token(text: pa.Array) -> pa.Array:
    return pc.or_kleene(pc.is_null(text), _token_in(text))


def _problem(mask: pa.Array, message: str) -> pa.Array:
    return pc.if_else(mask, pa.scalar(message), pa.scalar(None, pa.string()))


def merge_problems(*problems: pa.Array) -> pa.Array:
    """First non-null message per row."""
    out = problems[0]
    for p in problems[1:]:
        out = pc.coalesce(out, p)
    return out


def parse_scalar(text: pa.Array, target: pa.DataType, column: str) -> tuple[pa.Array, pa.Array]:
    """Text -> ``target`` values, with a problem per row that is not a number (or boolean) or lies beyond
    the type; null tokens become null without a problem.

    Integers are range-checked on their digits, so one value beyond the type costs its row, never the batch."""
    text = pc.utf8_trim_whitespace(text.cast(pa.string()))
    null = _is_null_token(text)
    if pa.types.is_string(target):
        return pc.if_else(null, pa.scalar(None, pa.string()), text), pa.nulls(len(text), pa.string())
    if pa.types.is_boolean(target):
        t = _token_in(text, _BOOL_TRUE)
        f = _token_in(text, _BOOL_FALSE)
        bad = pc.and_(pc.invert(null), pc.invert(pc.or_(t, f)))
        values = pc.if_else(null, pa.scalar(None, pa.bool_()), t)
        return values, _problem(bad, f"{column}: not a boolean")
    pattern = _INTEGER if pa.types.is_integer(target) else _NUMBER
    ok = pc.match_substring_regex(text, pattern)
    bad = pc.and_(pc.invert(null), pc.invert(pc.fill_null(ok, False)))
    clean = pc.if_else(pc.or_(null, bad), pa.scalar(None, pa.string()), text)
    if not pa.types.is_integer(target):
        return pc.cast(clean, target), _problem(bad, f"{column}: unparseable number")
    # Integers: a leading '+' is valid text ('+5'), which Arrow's cast refuses; the range is decided on
    # the digits themselves (a float64 round trip cannot tell 2**63 - 1 from 2**63), so one value beyond
    # the type is that row's problem, never an exception for the whole batch.
    clean = pc.replace_substring_regex(clean, r"^\+", "")
    negative = pc.fill_null(pc.starts_with(clean, "-"), False)
    digits = pc.replace_substring_regex(clean, r"^-?0*", "")
    n = pc.utf8_length(digits)
    info = np.iinfo(target.to_pandas_dtype())

    def beyond(limit: str) -> pa.Array:
        return pc.or_(pc.greater(n, len(limit)), pc.and_(pc.equal(n, len(limit)), pc.greater(digits, limit)))

    out_of_range = pc.fill_null(pc.if_else(negative, beyond(str(-int(info.min))), beyond(str(int(info.max)))), False)
    values = pc.cast(pc.if_else(out_of_range, pa.scalar(None, pa.string()), clean), target)
    problem = pc.coalesce(_problem(out_of_range, f"{column}: integer beyond the range of {target}"),
                          _problem(bad, f"{column}: unparseable number"))
    return values, problem


def parse_array(text: pa.Array, value_type: pa.DataType, column: str,
                expected_length: int | None = None) -> tuple[pa.ListArray, pa.Array]:
    """'[1,2,null]' / '(1, 2, nan)' -> list<value_type>; an empty field or 'null' -> null list.

    ``expected_length`` (if given) is enforced on non-null, non-empty lists; an
    empty array ``[]`` is kept as a null list (a missing band).
    """
    text = pc.utf8_trim_whitespace(text.cast(pa.string()))
    null = _is_null_token(text)
    opened = pc.or_(pc.starts_with(text, "["), pc.starts_with(text, "("))
    closed = pc.or_(pc.ends_with(text, "]"), pc.ends_with(text, ")"))
    shape_ok = pc.and_(opened, closed)
    bad_shape = pc.and_(pc.invert(null), pc.invert(pc.fill_null(shape_ok, False)))
    inner = pc.binary_slice(text.cast(pa.binary()), 1, -1).cast(pa.string())  # bytes: no UTF-8 decoding
    inner = pc.if_else(pc.or_(null, bad_shape), pa.scalar(None, pa.string()), inner)
    inner = pc.utf8_trim_whitespace(inner)
    empty = pc.fill_null(pc.equal(inner, ""), False)
    inner = pc.if_else(empty, pa.scalar(None, pa.string()), inner)
    parts = pc.split_pattern(inner, ",")
    flat = pc.list_flatten(parts)
    bad_value_rows = np.zeros(len(text), dtype=bool)
    is_null_value = _token_in(flat)
    try:  # fast path: well-formed numbers ("[1,2]" style, no padding)
        if pc.any(is_null_value).as_py():
            flat_clean = pc.if_else(is_null_value, pa.scalar(None, pa.string()), flat)
        else:
            flat_clean = flat
        values = pc.cast(flat_clean, value_type)
    except pa.ArrowInvalid:  # padded "(1, 2)" style, or genuinely bad values: validate each
        flat = pc.utf8_trim_whitespace(flat)
        is_null_value = _token_in(flat)
        ok = pc.or_(is_null_value, pc.fill_null(pc.match_substring_regex(flat, _NUMBER), False))
        parent = pc.list_parent_indices(parts)
        bad_idx = pc.filter(parent, pc.invert(ok)).to_numpy(zero_copy_only=False)
        bad_value_rows[bad_idx] = True
        clean = pc.if_else(pc.or_(is_null_value, pc.invert(ok)), pa.scalar(None, pa.string()), flat)
        values = pc.cast(clean, value_type)
    if pa.types.is_floating(value_type):  # a null element is a missing pixel: NaN, like the archive's float arrays
        values = pc.fill_null(values, pa.scalar(float("nan"), value_type))
    lengths = pc.list_value_length(parts)
    offsets = np.zeros(len(text) + 1, dtype=np.int32)
    np.cumsum(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False), out=offsets[1:])
    missing = pc.is_null(parts)
    lists = pa.ListArray.from_arrays(pa.array(offsets), values, mask=missing)
    problems = [_problem(bad_shape, f"{column}: not an array"),
                _problem(pa.array(bad_value_rows), f"{column}: unparseable number in array")]
    if expected_length is not None:
        wrong = pc.and_(pc.invert(missing), pc.not_equal(lengths, expected_length))
        msg = pc.binary_join_element_wise(
            f"{column}: ", pc.cast(lengths, pa.string()), f" values, expected {expected_length}", "")
        problems.append(pc.if_else(pc.fill_null(wrong, False), msg, pa.scalar(None, pa.string())))
    return lists, merge_problems(*problems)


def list_from_numpy(rows: list[np.ndarray | None], value_type: pa.DataType) -> pa.ListArray:
    """Object arrays of per-row numpy vectors (FITS/VOTable readers) -> list array; None -> null."""
    lengths = np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [np.asarray(r, dtype=value_type.to_pandas_dtype()) for r in rows if r is not None and len(r)]
    flat = np.concatenate(present) if present else np.zeros(0, dtype=value_type.to_pandas_dtype())
    mask = np.array([r is None or len(r) == 0 for r in rows])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type), mask=pa.array(mask))
