"""Reading GGUF headers (llama.cpp's model format) safely, from a file or from the first bytes of one.

Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count and metadata count (uint64), the
metadata key/value pairs, the tensor infos (name, dims, ggml type, offset), then the tensor data from
the first multiple of `general.alignment` (default 32). Spec: ggml's docs/gguf.md; the checks that
make a file loadable follow ggml's gguf.cpp.

Files may be hostile or damaged, so every count and length is checked against a bound and against the
bytes actually there before anything is read or allocated, large arrays (a tokenizer's 150,000 tokens)
are skipped rather than kept, and every problem is a GgufError with a reason. A prefix that ends before
the header does (a Range request of the first few MB) raises GgufTruncated, which says how many bytes
would be needed at least.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # 1 used 32-bit counts and lengths; nothing current writes it
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1_000_000  # the largest MoE models have ~50,000
MAX_KV = 100_000
MAX_STRING = 1 << 20  # chat templates, the longest strings in real headers, are tens of KB
MAX_ARRAY = 1 << 24  # vocabularies are < 1M entries
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml refuses more
MAX_NESTING = 3
KEEP_ARRAY = 1024  # longer arrays (tokens, merges, scores) are summarised by their length; per-layer
# arrays (head_count_kv of an 80-layer model) stay

# ggml tensor types: id -> (name, elements per block, bytes per block), from ggml.h / ggml-common.h.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip

# general.file_type (llama.cpp's llama_ftype) -> the quantisation label users know.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip

# metadata value types: id -> struct format; 8 is a string, 9 an array
SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class GgufError(ValueError):
    """The bytes are not a usable GGUF file; str() says why."""


class GgufTruncated(GgufError):
    """The data ended before the header did; `needed` is a byte count that would be enough at least,
    when known (for reading a longer prefix)."""

    def __init__(self, message: str, needed: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep: its element type and length."""

    type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        _name, block, size = GGML_TYPES[self.ggml_type]
        return self.elements // block * size

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(repr=False)
    data_offset: int  # where the tensor data starts in the file

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_value(self, name: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}")

    @property
    def architecture(self) -> str:
        return _str(self.metadata.get("general.architecture"))

    @property
    def name(self) -> str:
        return _str(self.metadata.get("general.name"))

    @property
    def block_count(self) -> int:
        """Layers (n_layer)."""
        return _count(self.arch_value("block_count"))

    @property
    def context_length(self) -> int:
        """The context the model was trained for (n_ctx_train); 0 when the header does not say."""
        return _count(self.arch_value("context_length"))

    @property
    def embedding_length(self) -> int:
        return _count(self.arch_value("embedding_length"))

    @property
    def feed_forward_length(self) -> int:
        return _count(self.arch_value("feed_forward_length"))

    @property
    def head_count(self) -> int:
        return _count(self.arch_value("attention.head_count"))

    @property
    def head_count_kv(self) -> int:
        """KV heads (grouped-query attention); per-layer lists give their largest; default head_count."""
        return _count(self.arch_value("attention.head_count_kv")) or self.head_count

    @property
    def key_length(self) -> int:
        """Per-head key size; llama.cpp's default is embedding_length / head_count."""
        return _count(self.arch_value("attention.key_length")) or _per_head(
            self.embedding_length, self.head_count
        )

    @property
    def value_length(self) -> int:
        explicit = _count(self.arch_value("attention.value_length"))
        return explicit or _per_head(self.embedding_length, self.head_count)

    @property
    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArraySummary):
            return tokens.length
        if isinstance(tokens, list):
            return len(tokens)
        return _count(self.arch_value("vocab_size"))

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def quantization(self) -> str:
        """The quantisation label (Q4_K_M, Q8_0, F16...) or "unknown"."""
        ft = self.file_type
        return FILE_TYPES.get(ft, "unknown") if ft is not None else "unknown"

    @property
    def tensor_data_size(self) -> int:
        """Bytes of all tensor data (what the weights take in memory)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def alignment(self) -> int:
        return _alignment(self.metadata)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    """A non-negative count from a metadata value: an int, or the largest of a per-layer list."""
    if isinstance(value, list):
        value = max((v for v in value if isinstance(v, int) and not isinstance(v, bool)), default=0)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


def _per_head(total: int, heads: int) -> int:
    return total // heads if heads else 0


def _alignment(metadata: dict[str, Any]) -> int:
    value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
        raise GgufError(f"general.alignment {value!r} is not a power of two")
    return value


class _Reader:
    """Sequential reads that never go past what is there (raising GgufTruncated instead).

    `source` is bytes or an mmap: both slice and work with struct.unpack_from without copying it all.
    """

    def __init__(self, source: Any, size: int) -> None:
        self.source = source
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GgufTruncated(f"truncated header: the data ends inside the {what}", self.pos + n)

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = bytes(self.source[self.pos : self.pos + n])
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.source, self.pos)[0]
        self.pos += size
        return value

    def length(self, what: str) -> int:
        n: int = self.unpack("<Q", f"length of the {what}")
        if n > MAX_STRING:
            raise GgufError(f"the {what} claims a string of {n} bytes, more than any header holds")
        return n

    def string(self, what: str) -> str:
        return self.read(self.length(what), what).decode("utf-8", "replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings (a vocabulary): a tight loop, as this is most of a header."""
        unpack, src, size, pos = _U64.unpack_from, self.source, self.size, self.pos
        for _ in range(count):
            if pos + 8 > size:
                raise GgufTruncated(f"truncated header: the data ends inside the {what}", pos + 8)
            n = unpack(src, pos)[0]
            if n > MAX_STRING:
                raise GgufError(f"the {what} claims a string of {n} bytes, more than any header holds")
            pos += 8 + n
        if pos > size:
            raise GgufTruncated(f"truncated header: the data ends inside the {what}", pos)
        self.pos = pos


def _value(r: _Reader, vtype: int, key: str, depth: int = 0) -> Any:
    """One metadata value; arrays longer than KEEP_ARRAY come back as an ArraySummary."""
    if vtype in SCALARS:
        return r.unpack(SCALARS[vtype], f"value of {key}")
    if vtype == STRING:
        return r.string(f"value of {key}")
    if vtype != ARRAY:
        raise GgufError(f"metadata {key!r} has an unknown value type {vtype}")
    if depth >= MAX_NESTING:
        raise GgufError(f"metadata {key!r} nests arrays more than {MAX_NESTING} deep")
    etype: int = r.unpack("<I", f"array type of {key}")
    count: int = r.unpack("<Q", f"array length of {key}")
    if count > MAX_ARRAY:
        raise GgufError(f"metadata {key!r}: an array of {count} elements is implausible")
    keep = count <= KEEP_ARRAY
    if etype in SCALARS:
        width = struct.calcsize(SCALARS[etype])
        if keep:
            return [r.unpack(SCALARS[etype], f"array {key}") for _ in range(count)]
        r.skip(count * width, f"array {key}")
    elif etype == STRING:
        if keep:
            return [r.string(f"array {key}") for _ in range(count)]
        r.need(count * 8, f"array {key}")  # every string takes its 8-byte length at least
        r.skip_strings(count, f"array {key}")
    elif etype == ARRAY:
        # Arrays of arrays are rare and short in real models; a long one could only be a way to make
        # the parser loop, so it is refused rather than walked.
        if not keep:
            raise GgufError(f"metadata {key!r}: an array of {count} arrays is implausible")
        r.need(count * 12, f"array {key}")  # each takes its type and length at least
        return [_value(r, ARRAY, key, depth + 1) for _ in range(count)]
    else:
        raise GgufError(f"metadata {key!r} is an array of unknown type {etype}")
    return ArraySummary(etype, count)


def _tensor(r: _Reader, i: int) -> TensorInfo:
    name = r.string(f"name of tensor {i}")
    n_dims: int = r.unpack("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GgufError(f"tensor {name!r} has {n_dims} dimensions (ggml supports 1 to {MAX_DIMS})")
    shape = tuple(int(r.unpack("<Q", f"shape of tensor {name!r}")) for _ in range(n_dims))
    ggml_type: int = r.unpack("<I", f"type of tensor {name!r}")
    offset: int = r.unpack("<Q", f"offset of tensor {name!r}")
    if ggml_type not in GGML_TYPES:
        raise GgufError(f"tensor {name!r} has an unknown ggml type {ggml_type}")
    info = TensorInfo(name, shape, ggml_type, offset)
    if any(d > 1 << 40 for d in shape) or info.elements > 1 << 48:
        raise GgufError(f"tensor {name!r} has an implausible shape {shape}")
    type_name, block, _size = GGML_TYPES[ggml_type]
    if shape[0] % block:
        raise GgufError(f"tensor {name!r}: a row of {shape[0]} is not a whole number of {type_name} blocks")
    return info


def _parse(r: _Reader) -> GgufHeader:
    magic = r.read(4, "magic")
    if magic != MAGIC:
        raise GgufError("not a GGUF file (it does not start with GGUF)")
    version: int = r.unpack("<I", "version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
            raise GgufError("big-endian GGUF files are not supported")
        raise GgufError(f"unsupported GGUF version {version} (supported: 2 and 3)")
    tensor_count: int = r.unpack("<Q", "tensor count")
    kv_count: int = r.unpack("<Q", "metadata count")
    if tensor_count > MAX_TENSORS:
        raise GgufError(f"tensor count {tensor_count} is implausible")
    if kv_count > MAX_KV:
        raise GgufError(f"metadata count {kv_count} is implausible")
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = r.string(f"key of metadata entry {i}")
        if key in metadata:
            raise GgufError(f"metadata key {key!r} appears twice")
        vtype: int = r.unpack("<I", f"type of {key}")
        metadata[key] = _value(r, vtype, key)
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(tensor_count):
        info = _tensor(r, i)
        if info.name in names:
            raise GgufError(f"tensor {info.name!r} appears twice")
        names.add(info.name)
        tensors.append(info)
    align = _alignment(metadata)
    data_offset = -(-r.pos // align) * align
    return GgufHeader(version, tensor_count, metadata, tensors, data_offset)


FIRST_READ = 4 << 20  # most headers fit (the starter model's is 1.8 MB); big vocabularies need more
MAX_HEADER = 256 << 20  # the largest real headers (260k-token vocabularies with merges) are ~30 MB


def read_header(source: Path | bytes) -> GgufHeader:
    """The header of a GGUF file, or of its first bytes (GgufTruncated when they are too few).

    A file is read from the start, more at a time until the header parses (never more than the file
    or MAX_HEADER). It is read, not memory-mapped: a mapped file that another program shortens kills
    the process with SIGBUS. I/O problems are OSError.
    """
    if isinstance(source, bytes | bytearray):
        return _parse(_Reader(source, len(source)))
    with source.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        data = f.read(min(FIRST_READ, size))
        while True:
            try:
                return _parse(_Reader(data, len(data)))
            except GgufTruncated as e:
                if len(data) >= size:
                    raise  # the file itself ends inside the header
                if len(data) >= MAX_HEADER:
                    raise GgufError(f"the header is larger than {MAX_HEADER >> 20} MiB") from None
                want = min(size, MAX_HEADER, max(e.needed or 0, 2 * len(data)))
                more = f.read(want - len(data))
                if not more:
                    raise  # shortened while we read
                data += more


def validate_file(path: Path) -> GgufHeader:
    """A whole, loadable GGUF file: the header parses, the tensors lie one after the other as ggml
    requires (each offset the padded end of the one before), and the file holds all their data."""
    try:
        header = read_header(path)
    except GgufTruncated as e:
        raise GgufError(f"the file is truncated ({e})") from None
    if header.tensor_count == 0:
        raise GgufError("it holds no tensors (no model weights)")
    size = path.stat().st_size
    align = header.alignment
    expected = 0
    for t in header.tensors:
        if t.offset != expected:
            raise GgufError(f"tensor {t.name!r} starts at offset {t.offset}, expected {expected} (damaged)")
        expected += -(-t.nbytes // align) * align
    last = header.tensors[-1]
    end = header.data_offset + last.offset + last.nbytes
    if end > size:
        raise GgufError(f"the file is truncated: its tensor data needs {end} bytes but the file has {size}")
    return header
