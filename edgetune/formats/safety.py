"""Files made by someone else: checks that run before edgetune reads what a file points to.

A bundle, adapter or app directory can pass its own checksums because whoever made it wrote the
checksums too. What these checks refuse, each with the file, the figure and the limit:

- a file name that leads out of its folder (absolute, ``..``, or a symlink whose target is outside);
- an ONNX graph that uses an operator domain other than ONNX's own, the Microsoft contrib ops
  edgetune emits and edgetune's kernels, or whose external data lies outside its folder, past the
  end of its file, or has a size other than its shape says;
- a safetensors file whose header is larger than :data:`MAX_HEADER` or whose tensors do not fit
  the file;
- sizes past the limits below (vocabulary, tensor elements), before anything is allocated.

The ONNX scan reads the protobuf wire format directly (the device side has no ``onnx`` package)
and skips tensor bytes without copying them.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

from edgetune.formats.errors import BundleError

# Operator domains edgetune's graphs use: ONNX's ("" and its aliases), Microsoft's contrib ops
# (FusedMatMul, MatMulNBits, ... from ONNX Runtime's optimizer and the int4 rewrite) and edgetune's kernels.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "edgetune"})
MAX_HEADER = 100 * 2**20          # safetensors' own limit on a header
MAX_VOCAB = 4 * 2**20             # the largest real vocabularies have about 256k entries
MAX_ELEMENTS = 2**36              # elements of one tensor (256 GB of float32)
MAX_TOKENIZER_BYTES = 256 * 2**20  # tokenizer.json (the largest real ones are about 35 MB)

_DTYPE_SIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_ST_DTYPE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def inside(root: Path, name: Any, what: str = "file") -> Path:
    """``root / name``, refused unless it stays in ``root``: no absolute path, no ``..``, no
    symlink (of the file or a folder on the way) that leads out."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"{root}: the {what} name {name!r} is not a file name; get the folder again from its maker")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{root}: the {what} {name!r} is an absolute path; a folder's files must be inside it "
                          "(refused: it could read any file on this machine)")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise BundleError(f"{root}: the {what} {name!r} leads out of the folder ('..'); refused")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise BundleError(f"{path}: a symlink leads out of {root} (to {real}); refused")
    return path


# -- protobuf wire format ------------------------------------------------------------------------
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints and fixed, a memoryview for bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise ValueError("a field runs past the end")
            v, i = buf[i:i + ln], i + ln
        elif wt == 1:
            v, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wt == 5:
            v, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"wire type {wt}")
        if i > n:
            raise ValueError("a field runs past the end")
        yield num, wt, v


def _text(v: Any) -> str:
    return bytes(v).decode("utf-8", errors="replace")


class _Scan:
    def __init__(self) -> None:
        self.domains: dict[str, str] = {}  # domain -> an op that uses it
        self.external: list[dict[str, Any]] = []

    def model(self, buf: memoryview) -> None:
        for num, wt, v in _fields(buf):
            if num == 7 and wt == 2:
                self.graph(v)
            elif num == 25 and wt == 2:  # FunctionProto: node = 3
                for n2, w2, v2 in _fields(v):
                    if n2 == 3 and w2 == 2:
                        self.node(v2)

    def graph(self, buf: memoryview) -> None:
        for num, wt, v in _fields(buf):
            if wt != 2:
                continue
            if num == 1:
                self.node(v)
            elif num in (5, 15):  # initializer, sparse_initializer (values = 1)
                self.tensor(v)

    def node(self, buf: memoryview) -> None:
        op, domain = "", ""
        for num, wt, v in _fields(buf):
            if wt != 2:
                continue
            if num == 4:
                op = _text(v)
            elif num == 7:
                domain = _text(v)
            elif num == 5:  # AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11
                for n2, w2, v2 in _fields(v):
                    if w2 == 2 and n2 in (6, 11):
                        self.graph(v2)
                    elif w2 == 2 and n2 in (5, 10):
                        self.tensor(v2)
        self.domains.setdefault(domain, op)

    def tensor(self, buf: memoryview) -> None:
        dims: list[int] = []
        dtype, name, location, ext = 0, "", 0, {}
        for num, wt, v in _fields(buf):
            if num == 1:
                if wt == 2:  # packed
                    j = 0
                    while j < len(v):
                        d, j = _varint(v, j)
                        dims.append(d)
                else:
                    dims.append(v)
            elif num == 2 and wt == 0:
                dtype = v
            elif num == 8 and wt == 2:
                name = _text(v)
            elif num == 13 and wt == 2:
                k = val = ""
                for n2, w2, v2 in _fields(v):
                    if n2 == 1 and w2 == 2:
                        k = _text(v2)
                    elif n2 == 2 and w2 == 2:
                        val = _text(v2)
                ext[k] = val
            elif num == 14 and wt == 0:
                location = v
        if location == 1 or ext:
            self.external.append({"name": name, "dims": [d if d < 2**63 else d - 2**64 for d in dims],
                                  "dtype": dtype, **ext})


def check_onnx(path: Path, root: Path | None = None) -> None:
    """Refuse an ONNX file whose operator domains are not :data:`ALLOWED_DOMAINS` or whose external
    data is outside ``root`` (default: its folder), past the end of its file, or of another size than
    its shape says. Reads the graph only, never the data it points to."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    fix = "get the model from its maker again, or export it again"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror or e})") from None
    scan = _Scan()
    try:
        scan.model(memoryview(raw))
    except (ValueError, IndexError) as e:
        raise BundleError(f"{path} is not an ONNX model (damaged protobuf: {e}); {fix}") from None
    bad = sorted(d for d in scan.domains if d not in ALLOWED_DOMAINS)
    if bad:
        raise BundleError(f"{path} uses operator domain {bad[0]!r} (op {scan.domains[bad[0]]}), which edgetune does not "
                          f"run: only ONNX's, com.microsoft's and edgetune's are allowed; {fix}")
    sizes: dict[str, int] = {}
    for t in scan.external:
        where = f"{path}: tensor {t['name']!r}"
        loc = t.get("location")
        if not loc:
            raise BundleError(f"{where} is external data without a location; {fix}")
        try:
            data = inside(root, loc, "external-data file")
        except BundleError as e:
            raise BundleError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
        if loc not in sizes:
            # A template's data file (app_base.onnx's base.onnx.data) is written later, by pack or merge.
            sizes[loc] = data.stat().st_size if data.is_file() else -1
        count = 1
        for d in t["dims"]:
            if d < 0 or d > MAX_ELEMENTS:
                raise BundleError(f"{where} has a dimension of {d} (limit {MAX_ELEMENTS}); {fix}")
            count *= d
            if count > MAX_ELEMENTS:
                raise BundleError(f"{where} has {count} or more elements (limit {MAX_ELEMENTS}); {fix}")
        try:
            offset = int(t.get("offset") or 0)
            length = int(t["length"]) if t.get("length") else None
        except ValueError:
            raise BundleError(f"{where} has a non-numeric offset or length; {fix}") from None
        need = count * _DTYPE_SIZE.get(t["dtype"], 1) if t["dtype"] not in (21, 22) else (count + 1) // 2
        if length is not None and length != need and t["dtype"] in _DTYPE_SIZE:
            raise BundleError(f"{where} declares {length} bytes of data, its shape {t['dims']} needs {need}; {fix}")
        end = offset + (length if length is not None else need)
        if offset < 0 or (sizes[loc] >= 0 and end > sizes[loc]):
            raise BundleError(f"{where}: its data (bytes {offset}-{end}) lies past the end of {data} "
                              f"({sizes[loc]} bytes); {fix}")


def check_safetensors(path: Path, fix: str = "get the file from its maker again") -> dict[str, Any]:
    """A safetensors file's header, refused before anything is allocated if it is larger than
    :data:`MAX_HEADER` or its tensors do not fit the file (offsets, shapes, dtypes)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{path} is not a safetensors file ({size} bytes, shorter than its header); {fix}")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER:
                raise BundleError(f"{path}: its safetensors header claims {n} bytes (limit {MAX_HEADER}); refused; {fix}")
            if 8 + n > size:
                raise BundleError(f"{path}: its safetensors header claims {n} bytes, the file has {size}; {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{path}: its safetensors header is not JSON; {fix}") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: its safetensors header is not an object; {fix}")
    data = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = [int(d) for d in e["shape"]]
            start, end = (int(x) for x in e["data_offsets"])
            width = _ST_DTYPE[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{path}: tensor {name!r} has a malformed entry in the header; {fix}") from None
        count = 1
        for d in shape:
            if d < 0:
                raise BundleError(f"{path}: tensor {name!r} has a negative dimension; {fix}")
            count *= d
            if count > MAX_ELEMENTS:
                raise BundleError(f"{path}: tensor {name!r} has {count} or more elements (limit {MAX_ELEMENTS}); {fix}")
        if not 0 <= start <= end <= data or end - start != count * width:
            raise BundleError(f"{path}: tensor {name!r} claims bytes {start}-{end} for shape {shape} ({e['dtype']}); "
                              f"the file holds {data} bytes of data; {fix}")
    return header


_CHECKED: dict[tuple[str, int, int], bool] = {}


def check_onnx_cached(path: Path, root: Path | None = None) -> None:
    """:func:`check_onnx`, once per file version in a process."""
    try:
        st = Path(path).stat()
    except OSError:
        return  # a missing file is the file list's error
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        check_onnx(Path(path), root)
        _CHECKED[key] = True


_NP_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1, "uint8": 1}


def check_index(root: Path, index: dict[str, Any], where: str) -> None:
    """A manifest's weight index ({name: {file, offset, length, dtype, shape}}): each entry's file
    inside ``root`` and its bytes inside that file and of the size its shape says."""
    sizes: dict[str, int] = {}
    for name, e in index.items():
        if not isinstance(e, dict) or "file" not in e:
            continue
        path = inside(root, e["file"], "weight file")
        if e["file"] not in sizes:
            sizes[e["file"]] = path.stat().st_size if path.is_file() else -1
        try:
            offset, length = int(e["offset"]), int(e["length"])
            count = 1
            for d in e.get("shape") or []:
                if int(d) < 0:
                    raise ValueError
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{where}: the entry of {name} is malformed; export the bundle again") from None
        width = _NP_SIZE.get(str(e.get("dtype")))
        if count > MAX_ELEMENTS or (width and length != count * width):
            raise BundleError(f"{where}: {name} declares {length} bytes for shape {e.get('shape')} ({e.get('dtype')}), "
                              f"which needs {count * (width or 1)}; export the bundle again")
        if offset < 0 or (sizes[e["file"]] >= 0 and offset + length > sizes[e["file"]]):
            raise BundleError(f"{where}: {name} lies at bytes {offset}-{offset + length}, past the end of {path} "
                              f"({sizes[e['file']]} bytes); export the bundle again")
