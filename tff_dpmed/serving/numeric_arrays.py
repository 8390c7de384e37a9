"""json.loads for request bodies whose bulk is arrays of plain numbers.

`json.loads` turns a 31 MB body of pixel values into ~9 million list slots
and nested lists, and numpy then copies them again: about 20 bytes of memory
per body byte at peak. Here every long enough span of the body made only of
`[`, `]`, `,`, whitespace and number characters that is a dense (rectangular)
array is parsed by numpy's C number parser straight into an array, in
chunks; `json.loads` parses what is left, with a placeholder string where
each array was, and the arrays are put back in their places.

Only exactly what `json.loads` would accept takes that path: the bracket
structure must be that of a dense array; every slot must hold one number
token in JSON's grammar (no `+1`, `.5`, `5.`, `01`, empty slots); an
integer span must have no token of 19 or more digits (it could exceed int64).
Anything else is left to `json.loads`, so error messages are unchanged.
Spans inside JSON strings, and spans not in a value position (after `:` or
`[`), are left alone too. If the rest of the body is not valid JSON, the
error json.loads finds in the placeholder document is reported at its
offset in the original body: the same message and offset json.loads(body)
gives, without json.loads ever building the huge lists.

Integer arrays get the smallest signed dtype that holds their values (int16
for pixels) and float arrays float64; `json_codec.json_to_tensor` checks and
converts both exactly as it does the lists `json.loads` makes.
"""

import json
import re
import secrets
from typing import Any, Optional

import numpy as np

# Shorter spans are not worth the detour.
MIN_SPAN_BYTES = 4096
_CHUNK_BYTES = 1 << 22

_SPAN = re.compile(rb"\[[\[\]0-9eE+\-., \t\r\n]{%d,}" % (MIN_SPAN_BYTES - 1))
_WHITESPACE = b" \t\r\n"
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
_QUOTE_OR_ESCAPE = re.compile(rb'\\.|"', re.DOTALL)
_NUMBER_CHARS = b"0123456789eE+-."
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
# In whitespace-free text: a token with a leading zero (JSON forbids 01, -01).
_LEADING_ZERO = re.compile(rb"[\[,]-?0[0-9]")
_INT64_UNSAFE = re.compile(rb"[0-9]{19}")
_EMPTY_SLOTS = (b",,", b"[,", b",]", b"[]")
# A '.' must sit between two digits: any other neighbour from the span's
# alphabet makes a token JSON rejects (.5, 5., 1.e5, -.5, ...).
_BAD_DOT_PAIRS = tuple(bytes([c, ord(".")]) for c in b"[],eE+-.") + tuple(
    bytes([ord("."), c]) for c in b"[],eE+-")


def loads(body: bytes) -> Any:
  """json.loads(body), with long numeric arrays returned as numpy arrays.

  Raises what json.loads(body) raises, with the same message and offset.
  """
  # (A regex, not lstrip: that would copy a body with leading whitespace.)
  if len(body) < MIN_SPAN_BYTES or not _OBJECT_START.match(body):
    return json.loads(body)
  arrays, pieces, shifts = {}, [], []
  nonce = secrets.token_hex(8)
  last = 0  # End of the last span replaced.
  in_string, scanned = False, 0
  chars = 0  # Length in characters of the pieces so far.
  for match in _SPAN.finditer(body):
    start = match.start()
    in_string = _in_string_after(body, scanned, start, in_string)
    scanned = match.end()  # A span holds no quote: the state is unchanged.
    if in_string or not _in_value_position(body, start):
      continue
    end = _balanced_end(body, start, match.end())
    array = None if end is None else parse_dense_array(body, start, end)
    if array is None:
      continue
    key = f"\x00{nonce}#{len(arrays)}"
    arrays[key] = array
    # Decoded as json.loads decodes bytes; a cut before an ASCII '[' never
    # splits a UTF-8 character.
    gap = body[last:start].decode("utf-8", "surrogatepass")
    placeholder = json.dumps(key)
    pieces += [gap, placeholder]
    chars += len(gap) + len(placeholder)
    shifts.append((chars, (end - start) - len(placeholder)))
    last = end
  if not arrays:
    return json.loads(body)
  pieces.append(body[last:].decode("utf-8", "surrogatepass"))
  try:
    doc = json.loads("".join(pieces))
  except json.JSONDecodeError as e:
    # Each placeholder stands where a valid array stood, in a value
    # position, so json.loads(body) fails with this message, further on.
    pos = e.pos + sum(shift for placeholder_end, shift in shifts
                      if placeholder_end <= e.pos)
    raise json.JSONDecodeError(e.msg, body.decode("utf-8", "surrogatepass"),
                               pos) from None
  del pieces
  found = set()
  doc = _put_back(doc, arrays, found)
  if len(found) != len(arrays):  # Cannot happen; never answer wrongly if so.
    return json.loads(body)
  return doc


def _in_string_after(body: bytes, start: int, stop: int, in_string: bool) -> bool:
  """Whether body[stop] is inside a JSON string, given the state at `start`."""
  for match in _QUOTE_OR_ESCAPE.finditer(body, start, stop):
    if match.group() == b'"':
      in_string = not in_string
  return in_string


def _in_value_position(body: bytes, start: int) -> bool:
  # After ':' or '[' an array is a value for sure; after ',' it could be an
  # object key, where json.loads(body) would fail with another message.
  before = body[max(0, start - 64):start].rstrip(_WHITESPACE)
  return before.endswith((b":", b"["))


def _balanced_end(body: bytes, start: int, end: int) -> Optional[int]:
  """Where the array that opens at `start` closes, within [start, end)."""
  trailing = _WHITESPACE + b","

  def strip(stop):
    while stop > start and body[stop - 1] in trailing:
      stop -= 1
    return stop

  end = strip(end)
  extra = body.count(b"]", start, end) - body.count(b"[", start, end)
  if extra < 0:
    return None  # The array goes on past the span (e.g. an object follows).
  for _ in range(extra):
    # More closes than opens: the span ran on into enclosing arrays' ends.
    end = strip(end - 1)
    if body[end - 1:end] != b"]":
      return None
  return end if body[end - 1:end] == b"]" else None


def parse_dense_array(body: bytes, start: int = 0, end: Optional[int] = None
                      ) -> Optional[np.ndarray]:
  """body[start:end], a dense JSON array of numbers -> ndarray; else None."""
  # Sliced here, not by the caller, so the copy is freed as soon as possible.
  compact = body[start:end].translate(None, _WHITESPACE)
  if any(pair in compact for pair in _EMPTY_SLOTS):
    return None
  if compact.count(b"+") != compact.count(b"e+") + compact.count(b"E+"):
    return None
  is_float = any(c in compact for c in (b".", b"e", b"E"))
  if is_float and any(pair in compact for pair in _BAD_DOT_PAIRS):
    return None
  if _LEADING_ZERO.search(compact):
    return None
  if not is_float and _INT64_UNSAFE.search(compact):
    return None
  skeleton = compact.translate(None, _NUMBER_CHARS)
  shape = _dense_shape(skeleton)
  del skeleton
  if shape is None:
    return None
  del compact
  # Parsed from the text with its whitespace: "1 2" must stay two tokens
  # (which numpy refuses), not become 12.
  values = _parse_numbers(body, start, len(body) if end is None else end,
                          int(np.prod(shape)), is_float)
  return None if values is None else values.reshape(shape)


def _dense_shape(skeleton: bytes) -> Optional[tuple[int, ...]]:
  """The shape whose bracket-and-comma skeleton this is exactly, or None."""
  rank = len(skeleton) - len(skeleton.lstrip(b"["))
  if rank == 0 or rank > 32:
    return None
  first_close = skeleton.find(b"]")
  inner = skeleton[rank - 1:first_close + 1]
  if inner.count(b",") != len(inner) - 2:
    return None
  dims = [len(inner) - 1]
  sub = inner
  for level in range(rank - 2, -1, -1):
    # Walk the first array at `level`: copies of `sub` separated by commas.
    pos, count = level + 1, 0
    while True:
      pos += len(sub)
      count += 1
      mark = skeleton[pos:pos + 1]
      if mark == b"]":
        break
      if mark != b",":
        return None
      pos += 1
    dims.insert(0, count)
    sub = b"[" + b",".join([sub] * count) + b"]"
  return tuple(dims) if sub == skeleton else None


def _parse_numbers(body: bytes, start: int, stop: int, count: int,
                   is_float: bool) -> Optional[np.ndarray]:
  """All `count` numbers of a checked span, parsed chunk by chunk."""
  chunks = []
  while start < stop:
    end = body.find(b",", min(start + _CHUNK_BYTES, stop), stop)
    end = stop if end < 0 else end
    text = body[start:end].translate(_BRACKETS_TO_SPACES)
    expected = text.count(b",") + 1
    try:
      values = np.fromstring(text, dtype=np.float64 if is_float else np.int64,  # pylint: disable=deprecated-method
                             sep=",")
    except ValueError:
      return None
    if values.size != expected:
      return None  # numpy stopped at something that is not a number.
    if not is_float and values.size:
      values = values.astype(np.promote_types(
          np.min_scalar_type(-1 - abs(int(values.min()))),
          np.min_scalar_type(-1 - abs(int(values.max())))))
    chunks.append(values)
    start = end + 1
  result = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
  return result if result.size == count else None


def _put_back(value: Any, arrays: dict, found: set) -> Any:
  if isinstance(value, str) and value in arrays:
    found.add(value)
    return arrays[value]
  if isinstance(value, list):
    return [_put_back(v, arrays, found) for v in value]
  if isinstance(value, dict):
    return {k: _put_back(v, arrays, found) for k, v in value.items()}
  return value
