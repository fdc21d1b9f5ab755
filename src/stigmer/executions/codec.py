"""Stigmer's payload codec: every payload Stigmer puts into Temporal (workflow inputs and results,
activity inputs and results, signals, failure messages) is encrypted with AES-256-GCM under the key in
STIGMER_HOME/payload.key, so `temporal workflow show` and the Web UI show ciphertext to anyone without it.
GCM also authenticates: a payload changed or made without the key does not decode.

Payloads that are not encrypted (something other than Stigmer started a workflow or sent a signal) pass
through decoding unchanged: they are not trusted anyway (see contract.py), and refusing them here would
only make Temporal retry the workflow task forever instead of letting it fail.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from stigmer.paths import Paths

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE = 12


class UnknownKey(Exception):
    pass


def _codec_class() -> type:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from temporalio.api.common.v1 import Payload
    from temporalio.converter import PayloadCodec

    class AesGcmCodec(PayloadCodec):
        def __init__(self, key: bytes) -> None:
            from stigmer.server.keys import key_id

            self.aead = AESGCM(key)
            self.key_id = key_id(key).encode()

        async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
            return [self.seal(p) for p in payloads]

        async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
            return [self.open(p) for p in payloads]

        def seal(self, p: Payload) -> Payload:
            nonce = os.urandom(NONCE)
            sealed = nonce + self.aead.encrypt(nonce, p.SerializeToString(), self.key_id)
            return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id}, data=sealed)

        def open(self, p: Payload) -> Payload:
            if p.metadata.get("encoding") != ENCODING:
                return p
            if p.metadata.get(KEY_ID) != self.key_id:
                raise UnknownKey(
                    "a payload was encrypted with another Stigmer key "
                    f"({p.metadata.get(KEY_ID, b'').decode(errors='replace')[:32]}): this worker and the "
                    "server do not share STIGMER_PAYLOAD_KEY"
                )
            data = bytes(p.data)
            return Payload.FromString(self.aead.decrypt(data[:NONCE], data[NONCE:], self.key_id))

    return AesGcmCodec


def codec(key: bytes) -> Any:
    return _codec_class()(key)


def data_converter(paths: Paths) -> Any:
    """Temporal's default converter with this codec, failure messages and stack traces encrypted too."""
    import dataclasses

    import temporalio.converter as tc

    from stigmer.server.keys import payload_key

    return dataclasses.replace(
        tc.DataConverter.default,
        payload_codec=codec(payload_key(paths)),
        failure_converter_class=tc.DefaultFailureConverterWithEncodedAttributes,
    )


async def decode_json(key: bytes, body: dict[str, Any]) -> dict[str, Any]:
    """The remote-codec protocol of Temporal's Web UI and CLI (`POST /decode`): {"payloads": [...]} in
    protobuf JSON, answered in kind."""
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    payloads = json_format.ParseDict(body, Payloads(), ignore_unknown_fields=True)
    decoded = await codec(key).decode(list(payloads.payloads))
    return dict(json_format.MessageToDict(Payloads(payloads=decoded)))
