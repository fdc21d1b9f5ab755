"""Stigmer's payload codec: every payload Stigmer puts into Temporal (workflow inputs and results,
activity inputs and results, signals, failure messages) is encrypted with AES-256-GCM under the key in
STIGMER_HOME/payload.key, so `temporal workflow show` and the Web UI show ciphertext to anyone without it.
GCM also authenticates: a payload changed or made without the key does not decode.

Payloads that are not encrypted (something other than Stigmer started a workflow or sent a signal) pass
through decoding unchanged: they are not trusted anyway (see contract.py), and refusing them here would
only make Temporal retry the workflow task forever instead of letting it fail.

The claim check: a sealed payload over THRESHOLD bytes (a 64 KB tool result, a long answer, a model
request carrying them) does not go into Temporal's history. Its sealed bytes go to a payload store
(payload_store.py: the API's database, directly or through the API) under their sha256, and Temporal
gets only that reference. Decoding fetches the bytes, checks their sha256, then decrypts as any other.
A store that cannot be reached fails the encode (Temporal retries the task); nothing large is ever sent
inline instead. Without a store (store=None) payloads stay inline, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from stigmer.paths import Paths

ENCODING = b"binary/encrypted"
CLAIM_CHECK = b"binary/stigmer-claim-check"
KEY_ID = "encryption-key-id"
SIZE = "stigmer-size"  # a reference's metadata: how many sealed bytes it stands for
NONCE = 12
# Sealed payloads larger than this go to the payload store. 16 KB: a chat message, an answer, a small
# tool result stay inline (no round trip to the store); a large tool result, or a model request that
# carries the turn's earlier results again, is a 64-byte reference, so a turn's history grows by at most
# ~16 KB per payload however large what it handles is (Temporal warns at 512 KB per payload, refuses 2 MB).
THRESHOLD = 16 * 1024


class UnknownKey(Exception):
    pass


class ClaimCheckError(Exception):
    """A reference that cannot be resolved: no store, a missing payload, or stored bytes that changed."""


def _codec_class() -> type:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from temporalio.api.common.v1 import Payload
    from temporalio.converter import PayloadCodec

    class AesGcmCodec(PayloadCodec):
        def __init__(self, key: bytes, store: Any = None) -> None:
            from stigmer.server.keys import key_id

            self.aead = AESGCM(key)
            self.key_id = key_id(key).encode()
            self.store = store

        async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
            sealed = [self.seal(p) for p in payloads]
            if self.store is None or all(len(p.data) <= THRESHOLD for p in sealed):
                return sealed
            return list(await asyncio.gather(*(self.check_in(p) for p in sealed)))

        async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
            if any(p.metadata.get("encoding") == CLAIM_CHECK for p in payloads):
                payloads = await asyncio.gather(*(self.check_out(p) for p in payloads))
            return [self.open(p) for p in payloads]

        async def check_in(self, p: Payload) -> Payload:
            """A sealed payload over THRESHOLD: stored, and replaced by its reference."""
            if len(p.data) <= THRESHOLD:
                return p
            data = bytes(p.data)
            ref = hashlib.sha256(data).hexdigest()
            await self.store.put(ref, data)  # raises when it cannot: never sent inline instead
            return Payload(
                metadata={"encoding": CLAIM_CHECK, KEY_ID: self.key_id, SIZE: str(len(data)).encode()},
                data=ref.encode(),
            )

        async def check_out(self, p: Payload) -> Payload:
            """A reference: the sealed payload it stands for, its sha256 checked."""
            if p.metadata.get("encoding") != CLAIM_CHECK:
                return p
            self.known_key(p)
            ref = bytes(p.data).decode(errors="replace")
            if self.store is None:
                raise ClaimCheckError(
                    f"payload {ref[:80]} is stored by reference and there is no payload store here"
                )
            from stigmer.executions.payload_store import PayloadMissing

            try:
                data = await self.store.get(ref)
            except PayloadMissing as e:
                raise ClaimCheckError(f"a payload stored by reference cannot be found: {e}") from None
            if hashlib.sha256(data).hexdigest() != ref:
                raise ClaimCheckError(
                    f"the stored bytes of payload {ref[:80]} have changed (their sha256 differs)"
                )
            return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id}, data=data)

        def known_key(self, p: Payload) -> None:
            if p.metadata.get(KEY_ID) != self.key_id:
                raise UnknownKey(
                    "a payload was encrypted with another Stigmer key "
                    f"({p.metadata.get(KEY_ID, b'').decode(errors='replace')[:32]}): this worker and the "
                    "server do not share STIGMER_PAYLOAD_KEY"
                )

        def seal(self, p: Payload) -> Payload:
            nonce = os.urandom(NONCE)
            sealed = nonce + self.aead.encrypt(nonce, p.SerializeToString(), self.key_id)
            return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id}, data=sealed)

        def open(self, p: Payload) -> Payload:
            if p.metadata.get("encoding") != ENCODING:
                return p
            self.known_key(p)
            data = bytes(p.data)
            return Payload.FromString(self.aead.decrypt(data[:NONCE], data[NONCE:], self.key_id))

    return AesGcmCodec


def codec(key: bytes, store: Any = None) -> Any:
    return _codec_class()(key, store)


def data_converter(paths: Paths, store: Any = None) -> Any:
    """Temporal's default converter with this codec, failure messages and stack traces encrypted too;
    payloads over THRESHOLD kept in `store` (a payload_store.PayloadStore; None: all inline)."""
    import dataclasses

    import temporalio.converter as tc

    from stigmer.server.keys import payload_key

    return dataclasses.replace(
        tc.DataConverter.default,
        payload_codec=codec(payload_key(paths), store),
        failure_converter_class=tc.DefaultFailureConverterWithEncodedAttributes,
    )


async def decode_json(key: bytes, body: dict[str, Any], store: Any = None) -> dict[str, Any]:
    """The remote-codec protocol of Temporal's Web UI and CLI (`POST /decode`): {"payloads": [...]} in
    protobuf JSON, answered in kind (references resolved from `store`)."""
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    payloads = json_format.ParseDict(body, Payloads(), ignore_unknown_fields=True)
    decoded = await codec(key, store).decode(list(payloads.payloads))
    return dict(json_format.MessageToDict(Payloads(payloads=decoded)))
