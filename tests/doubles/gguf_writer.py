"""A minimal GGUF writer for tests: headers of any model shape, optionally with (zero) tensor data.

Written from ggml's docs/gguf.md and independent of stigmer.llm.gguf (its own tables), so the reader is
checked against a second implementation rather than against itself. Tensors are laid out as ggml
requires: each offset the padded end of the one before. `llama_like` builds the tensor list of a
llama/qwen2-style decoder so parameter counts and sizes come out as the real models'.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FORMATS = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
    BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}  # fmt: skip

# ggml types used here: id -> (elements per block, bytes per block), from ggml-common.h
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 8, 12, 14
BLOCKS = {
    F32: (1, 4),
    F16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q6_K: (256, 210),
}
# general.file_type values
FT_Q4_1, FT_Q8_0, FT_Q4_K_M = 3, 7, 15


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (arrays: `etype` is the element type)."""

    vtype: int
    value: Any
    etype: int | None = None


def u32(v: int) -> Typed:
    return Typed(UINT32, v)


def u64(v: int) -> Typed:
    return Typed(UINT64, v)


def array(etype: int, values: Sequence[Any]) -> Typed:
    return Typed(ARRAY, list(values), etype)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def nbytes(self) -> int:
        block, size = BLOCKS[self.ggml_type]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _typed(value: Any) -> Typed:
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(UINT32 if 0 <= value < 1 << 32 else INT64, value)
    if isinstance(value, float):
        return Typed(FLOAT32, value)
    if isinstance(value, str):
        return Typed(STRING, value)
    if isinstance(value, list):
        first = _typed(value[0]) if value else Typed(INT32, 0)
        return Typed(ARRAY, value, first.vtype)
    raise TypeError(f"no GGUF type for {value!r}")


def encode_value(t: Typed) -> bytes:
    """The type id and payload of a metadata value."""
    return struct.pack("<I", t.vtype) + _payload(t)


def _payload(t: Typed) -> bytes:
    if t.vtype in _FORMATS:
        return struct.pack(_FORMATS[t.vtype], t.value)
    if t.vtype == STRING:
        return _string(t.value)
    assert t.vtype == ARRAY and t.etype is not None
    head = struct.pack("<IQ", t.etype, len(t.value))
    if t.etype == STRING:
        return head + b"".join(_string(v) for v in t.value)
    if t.etype == ARRAY:
        return head + b"".join(_payload(_typed(v)) for v in t.value)
    fmt = _FORMATS[t.etype]
    return head + b"".join(struct.pack(fmt, v) for v in t.value)


def padded(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


def header_bytes(
    metadata: Mapping[str, Any],
    tensors: Sequence[Tensor] = (),
    *,
    version: int = 3,
    alignment: int = 32,
    offsets: Sequence[int] | None = None,
    pad: bool = True,
) -> bytes:
    """The header up to the start of the data section (padded to `alignment` unless pad=False)."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for key, value in metadata.items():
        out.append(_string(key) + encode_value(_typed(value)))
    offset = 0
    for i, t in enumerate(tensors):
        at = offsets[i] if offsets is not None else offset
        out.append(_string(t.name) + struct.pack("<I", len(t.shape)))
        out.append(b"".join(struct.pack("<Q", d) for d in t.shape) + struct.pack("<IQ", t.ggml_type, at))
        offset += padded(t.nbytes, alignment)
    raw = b"".join(out)
    return raw + b"\0" * (padded(len(raw), alignment) - len(raw)) if pad else raw


def data_size(tensors: Sequence[Tensor], alignment: int = 32) -> int:
    """Bytes of the data section: every tensor padded, except that the file may end right after the
    last one's data."""
    if not tensors:
        return 0
    return sum(padded(t.nbytes, alignment) for t in tensors[:-1]) + tensors[-1].nbytes


def write_gguf(
    path: Path,
    metadata: Mapping[str, Any],
    tensors: Sequence[Tensor],
    *,
    alignment: int = 32,
    cut: int = 0,
) -> Path:
    """A whole GGUF file with zeroed tensor data; `cut` bytes short of complete when asked."""
    with path.open("wb") as f:
        f.write(header_bytes(metadata, tensors, alignment=alignment))
        f.write(b"\0" * (data_size(tensors, alignment) - cut))
    return path


def llama_like(
    arch: str,
    *,
    n_layers: int,
    n_head: int,
    n_head_kv: int,
    n_embd: int,
    n_ff: int,
    n_ctx: int,
    n_vocab: int,
    file_type: int,
    matrix_type: int,
    output_type: int,
    qkv_bias: bool = False,
    name: str = "synthetic",
) -> tuple[dict[str, Any], list[Tensor]]:
    """Metadata and tensors of a llama-style decoder (qwen2: qkv_bias=True), tokenizer included."""
    head_dim = n_embd // n_head
    kv_dim = head_dim * n_head_kv
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": u32(file_type),
        f"{arch}.block_count": u32(n_layers),
        f"{arch}.context_length": u32(n_ctx),
        f"{arch}.embedding_length": u32(n_embd),
        f"{arch}.feed_forward_length": u32(n_ff),
        f"{arch}.attention.head_count": u32(n_head),
        f"{arch}.attention.head_count_kv": u32(n_head_kv),
        f"{arch}.rope.freq_base": 1000000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": array(STRING, [f"tok{i}" for i in range(n_vocab)]),
        "tokenizer.ggml.token_type": array(INT32, [1] * n_vocab),
        "general.quantization_version": u32(2),
    }
    tensors = [Tensor("token_embd.weight", (n_embd, n_vocab), matrix_type)]
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [
            Tensor(p + "attn_norm.weight", (n_embd,), F32),
            Tensor(p + "attn_q.weight", (n_embd, n_embd), matrix_type),
            Tensor(p + "attn_k.weight", (n_embd, kv_dim), matrix_type),
            Tensor(p + "attn_v.weight", (n_embd, kv_dim), matrix_type),
            Tensor(p + "attn_output.weight", (n_embd, n_embd), matrix_type),
            Tensor(p + "ffn_norm.weight", (n_embd,), F32),
            Tensor(p + "ffn_gate.weight", (n_embd, n_ff), matrix_type),
            Tensor(p + "ffn_up.weight", (n_embd, n_ff), matrix_type),
            Tensor(p + "ffn_down.weight", (n_ff, n_embd), matrix_type),
        ]
        if qkv_bias:
            tensors += [
                Tensor(p + "attn_q.bias", (n_embd,), F32),
                Tensor(p + "attn_k.bias", (kv_dim,), F32),
                Tensor(p + "attn_v.bias", (kv_dim,), F32),
            ]
    tensors += [
        Tensor("output_norm.weight", (n_embd,), F32),
        Tensor("output.weight", (n_embd, n_vocab), output_type),
    ]
    return metadata, tensors


def qwen25_coder_7b() -> tuple[dict[str, Any], list[Tensor]]:
    """qwen2.5-coder:7b's shape (Ollama's Q4_K_M): Q4_K matrices, a Q6_K output (real files also put
    half the attn_v and ffn_down tensors in Q6_K, so they are ~0.25 GB larger)."""
    return llama_like(
        "qwen2", n_layers=28, n_head=28, n_head_kv=4, n_embd=3584, n_ff=18944, n_ctx=32768, n_vocab=152064,
        file_type=FT_Q4_K_M, matrix_type=Q4_K, output_type=Q6_K, qkv_bias=True,
        name="Qwen2.5 Coder 7B Instruct",
    )  # fmt: skip


def tiny_llama(*, n_vocab: int = 64) -> tuple[dict[str, Any], list[Tensor]]:
    """A model small enough to write in full (a few hundred KB)."""
    return llama_like(
        "llama", n_layers=2, n_head=4, n_head_kv=2, n_embd=64, n_ff=128, n_ctx=2048, n_vocab=n_vocab,
        file_type=FT_Q8_0, matrix_type=Q8_0, output_type=Q8_0, name="tiny",
    )  # fmt: skip
