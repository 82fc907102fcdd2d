"""Encryption at rest of payee data (PII): AES-256-GCM under the service's own keys.

    stored value = nonce (12 random bytes) ‖ ciphertext ‖ tag (16 bytes), with key_id beside it
    associated data = "clearhouse/payments/payee/v1|<payment id>|<field>"

The associated data binds a ciphertext to its payment and field: a value copied onto
another payment, or a name swapped into the IBAN column, fails to decrypt instead of
quietly showing someone else's account. The key id stored with each row selects the key,
so rotation is: add a key to the keyring, make it current, re-encrypt at leisure; old
rows keep decrypting until then.

Only this module ever sees payee plaintext at rest, and only to hand it to a processor. It
must never log, return in an error, or persist a plaintext value, and never reuse a nonce
(a fresh random one per value; 2^-32 collision bound is far beyond this service's volume
per key).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
_AAD_PREFIX = b"clearhouse/payments/payee/v1|"


class PayeeDecryptionError(Exception):
    """A stored payee value could not be decrypted (unknown key id, or tampered data)."""


@dataclass(frozen=True)
class SealedPayee:
    key_id: str
    name: bytes
    iban: bytes


@dataclass(frozen=True)
class Payee:
    name: str
    iban: str

    def __repr__(self) -> str:  # a stray repr in a log or traceback must not carry PII
        return "Payee(<encrypted at rest>)"


class PayeeCipher:
    def __init__(self, *, current_key_id: str, keyring: Mapping[str, bytes]) -> None:
        if current_key_id not in keyring:
            raise ValueError("the current key id is not in the keyring")
        self.current_key_id = current_key_id
        self._aeads = {key_id: AESGCM(key) for key_id, key in keyring.items()}

    def seal(self, *, payment_id: uuid.UUID, payee: Payee) -> SealedPayee:
        aead = self._aeads[self.current_key_id]
        return SealedPayee(
            key_id=self.current_key_id,
            name=_encrypt(aead, payee.name.encode(), _aad(payment_id, "name")),
            iban=_encrypt(aead, payee.iban.encode(), _aad(payment_id, "iban")),
        )

    def open(self, *, payment_id: uuid.UUID, sealed: SealedPayee) -> Payee:
        aead = self._aeads.get(sealed.key_id)
        if aead is None:
            raise PayeeDecryptionError(f"no key {sealed.key_id!r} in the keyring")
        try:
            name = aead.decrypt(sealed.name[:NONCE_BYTES], sealed.name[NONCE_BYTES:], _aad(payment_id, "name"))
            iban = aead.decrypt(sealed.iban[:NONCE_BYTES], sealed.iban[NONCE_BYTES:], _aad(payment_id, "iban"))
        except (InvalidTag, ValueError):
            raise PayeeDecryptionError("payee data failed authentication") from None
        return Payee(name=name.decode(), iban=iban.decode())


def _encrypt(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def _aad(payment_id: uuid.UUID, field: str) -> bytes:
    return _AAD_PREFIX + str(payment_id).encode() + b"|" + field.encode()


def cipher_from_settings(settings) -> PayeeCipher:
    current, keyring = settings.payee_keyring()
    return PayeeCipher(current_key_id=current, keyring=keyring)
