"""IBAN validation and payee encryption, without I/O."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from services.payments.crypto import NONCE_BYTES, Payee, PayeeCipher, PayeeDecryptionError
from services.payments.domain import IBAN_LENGTHS, check_text, normalize_iban


def with_check_digits(country: str, bban: str) -> str:
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


@st.composite
def valid_ibans(draw):
    country = draw(st.sampled_from(sorted(IBAN_LENGTHS)))
    bban = draw(st.text(string.ascii_uppercase + string.digits, min_size=IBAN_LENGTHS[country] - 4,
                        max_size=IBAN_LENGTHS[country] - 4))
    return with_check_digits(country, bban)


@given(valid_ibans())
def test_every_valid_iban_is_accepted_in_any_spacing_and_case(iban):
    grouped = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)).lower()
    assert normalize_iban(iban) == iban == normalize_iban(grouped)


@settings(max_examples=300)
@given(valid_ibans(), st.data())
def test_any_single_character_error_is_caught(iban, data):
    position = data.draw(st.integers(min_value=2, max_value=len(iban) - 1))
    replacement = data.draw(st.sampled_from(string.digits if iban[position].isdigit() else string.ascii_uppercase)
                            .filter(lambda ch: ch != iban[position]))
    broken = iban[:position] + replacement + iban[position + 1:]
    with pytest.raises(ValueError):
        normalize_iban(broken)


@pytest.mark.parametrize("bad", ["DE89 3704 0044 0532 0130 0", "DE89370400440532013000X", "XX89370400440532013000",
                                 "DE89-3704-0044-0532-0130-00", "ДE89370400440532013000", ""])
def test_malformed_ibans_are_refused_without_echoing_them(bad):
    with pytest.raises(ValueError) as refused:
        normalize_iban(bad)
    assert bad.replace(" ", "")[4:] not in str(refused.value) or not bad


@pytest.mark.parametrize("bad", ["a\x00b", "tab\there", "\ud800", " padded", "padded "])
def test_text_with_control_characters_is_refused(bad):
    with pytest.raises(ValueError):
        check_text(bad)


KEYS = {"k1": b"\x01" * 32, "k2": b"\x02" * 32}


@given(st.text(min_size=1, max_size=140), valid_ibans())
def test_sealed_payee_opens_to_the_same_values(name, iban):
    cipher = PayeeCipher(current_key_id="k1", keyring=KEYS)
    payment_id = uuid.uuid4()
    sealed = cipher.seal(payment_id=payment_id, payee=Payee(name=name, iban=iban))
    assert iban.encode() not in sealed.iban and sealed.key_id == "k1"
    assert cipher.open(payment_id=payment_id, sealed=sealed) == Payee(name=name, iban=iban)


def test_a_ciphertext_is_bound_to_its_payment_and_field():
    cipher = PayeeCipher(current_key_id="k1", keyring=KEYS)
    pid = uuid.uuid4()
    sealed = cipher.seal(payment_id=pid, payee=Payee(name="Jane", iban="DE89370400440532013000"))
    with pytest.raises(PayeeDecryptionError):
        cipher.open(payment_id=uuid.uuid4(), sealed=sealed)  # copied onto another payment
    swapped = type(sealed)(key_id=sealed.key_id, name=sealed.iban, iban=sealed.name)
    with pytest.raises(PayeeDecryptionError):
        cipher.open(payment_id=pid, sealed=swapped)  # fields swapped
    flipped = type(sealed)(key_id="k1", name=sealed.name[:-1] + bytes([sealed.name[-1] ^ 1]), iban=sealed.iban)
    with pytest.raises(PayeeDecryptionError):
        cipher.open(payment_id=pid, sealed=flipped)  # tampered


def test_rotation_new_values_use_the_current_key_old_ones_still_open():
    old = PayeeCipher(current_key_id="k1", keyring=KEYS)
    pid = uuid.uuid4()
    sealed_before = old.seal(payment_id=pid, payee=Payee(name="Jane", iban="DE89370400440532013000"))
    rotated = PayeeCipher(current_key_id="k2", keyring=KEYS)
    assert rotated.seal(payment_id=pid, payee=Payee(name="Jane", iban="DE89370400440532013000")).key_id == "k2"
    assert rotated.open(payment_id=pid, sealed=sealed_before).name == "Jane"
    retired = PayeeCipher(current_key_id="k2", keyring={"k2": KEYS["k2"]})
    with pytest.raises(PayeeDecryptionError):
        retired.open(payment_id=pid, sealed=sealed_before)


def test_every_value_gets_its_own_nonce_and_no_repr_shows_plaintext():
    cipher = PayeeCipher(current_key_id="k1", keyring=KEYS)
    payee = Payee(name="Jane", iban="DE89370400440532013000")
    nonces = {cipher.seal(payment_id=uuid.uuid4(), payee=payee).iban[:NONCE_BYTES] for _ in range(200)}
    assert len(nonces) == 200
    assert "Jane" not in repr(payee) and "DE89" not in repr(payee)
