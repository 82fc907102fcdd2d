"""Masking of personal and secret data before it leaves a process in a log line, a span
or an event payload.

Events and logs carry masked values only (ARCHITECTURE.md section 5): a payee's IBAN
shows its country, check digits and last four characters, a name only its initials, and
credentials nothing at all. Every service masks through these functions so that one rule
decides what an operator may see.

This module must never log, store or return the unmasked value it is given, and must never
raise on odd input (a redactor that throws would take the log line or the span with it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

REDACTED = "[REDACTED]"
# Fixed width whatever the input length, so the mask does not reveal how long the hidden
# part is (which for account numbers narrows down the bank).
_STARS = "********"

# Key names are compared after lower-casing and turning '-' and ' ' into '_', so that
# `X-Api-Key`, `api key` and `api_key` are one rule.
_SECRET_KEY_PARTS = ("authorization", "api_key", "apikey", "password", "passwd", "secret", "token", "cookie")
_IBAN_KEYS = frozenset({"iban", "payee_iban", "debtor_iban", "creditor_iban"})
_ACCOUNT_KEYS = frozenset({"account_number", "accountnumber", "account_no", "bank_account_number"})
_NAME_KEYS = frozenset({"payee_name", "debtor_name", "creditor_name", "holder_name", "account_holder"})
# Inside these containers a plain `name` is a person's name (a payee), not a label.
_PERSON_CONTAINERS = frozenset({"payee", "debtor", "creditor", "beneficiary"})

# An IBAN as it appears in free text: compact, or printed in groups of four. Candidates
# are confirmed with the ISO 7064 mod-97 check, so ids and codes that merely look similar
# are left alone.
_IBAN_IN_TEXT = re.compile(
    r"\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b"
)
# SQLAlchemy appends bound parameters to the text of a database error, on a line of their
# own ("[parameters: ('DE89...', 1200)]"; the repr escapes newlines): values, never fit for
# a log or a span. The rest of that line goes.
_SQL_PARAMETERS = re.compile(r"\[parameters: [^\n]*")
# The password in a URL's userinfo (`postgresql://app:s3cret@db/payments`).
_URL_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]+):([^@\s/]+)@", re.IGNORECASE)
# `name=value` pairs whose name says credential, as in a query string or a DSN option.
_SECRET_ASSIGNMENT = re.compile(
    # Bounded name length: unbounded `\w*` on both sides backtracks quadratically on long words.
    r"\b(\w{0,48}?(?:token|secret|password|passwd|api_key|apikey)\w{0,48})=([^&\s\"',;]+)", re.IGNORECASE
)


def mask_iban(iban: Any) -> str:
    """`DE89 3704 0044 0532 0130 00` -> `DE89********3000`: country and check digits stay
    (they say which scheme, not which account), the last four let a person recognise it."""
    compact = _compact(iban)
    if len(compact) < 12:
        return _STARS
    return f"{compact[:4]}{_STARS}{compact[-4:]}"


def mask_account_number(number: Any) -> str:
    """`0532013000` -> `********3000`; short numbers are hidden entirely."""
    compact = _compact(number)
    if len(compact) < 8:
        return _STARS
    return f"{_STARS}{compact[-4:]}"


def mask_name(name: Any) -> str:
    """`Jane Doe` -> `J*** D**`: each word keeps its first letter."""
    words = str(name).split()
    return " ".join(word[0] + "*" * (len(word) - 1) for word in words)


def mask_secret(_value: Any) -> str:
    """Credentials are never shown, not even in part."""
    return REDACTED


def scrub_text(text: str) -> str:
    """Mask what can be recognised inside free text: IBANs, SQL parameter lists, URL
    passwords and `password=...`-style assignments.

    Free text (a log message, an exception, a span status) has no keys to go by, so only
    patterns that identify sensitive data on their own are handled here."""
    # Each pattern runs only where its anchor occurs: every span attribute and log line
    # passes through here, and most contain none of them.
    if "[parameters: " in text:
        text = _SQL_PARAMETERS.sub("[parameters: hidden]", text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    if "=" in text:
        text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _IBAN_IN_TEXT.sub(_mask_iban_match, text)


def redact(value: Any, key: str | None = None, *, in_person: bool = False) -> Any:
    """A copy of `value` with sensitive fields masked, judged by their key names.

    Mappings and sequences are walked; the input is never modified. Strings under
    harmless keys still go through `scrub_text`."""
    masker = masker_for(key, in_person=in_person)
    if masker is mask_secret:
        return REDACTED  # whatever its shape: a credential is hidden whole
    if masker is not None and not isinstance(value, Mapping | list | tuple):
        return None if value is None else masker(value)
    if isinstance(value, Mapping):
        child_in_person = _normal(key) in _PERSON_CONTAINERS if key is not None else False
        return {k: redact(v, str(k), in_person=child_in_person) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item, key, in_person=in_person) for item in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


@lru_cache(maxsize=4096)  # keys are field and attribute names: few, and asked about on every span
def masker_for(key: str | None, *, in_person: bool = False):
    """The masking function for a field named `key`, or None when the name is harmless.

    Dotted keys (span attributes such as `clearhouse.payee.iban`) are judged by their
    last segment, with the segment before it deciding whether `name` is a person's."""
    if not key:
        return None
    segments = _normal(key).split(".")
    last = segments[-1]
    if len(segments) > 1 and segments[-2] in _PERSON_CONTAINERS:
        in_person = True
    if any(part in last for part in _SECRET_KEY_PARTS):
        return mask_secret
    if last in _IBAN_KEYS or last.endswith("_iban"):
        return mask_iban
    if last in _ACCOUNT_KEYS:
        return mask_account_number
    if last in _NAME_KEYS or (in_person and last == "name"):
        return mask_name
    return None


def is_valid_iban(candidate: str) -> bool:
    """ISO 13616 check digits (mod 97 == 1)."""
    compact = _compact(candidate)
    if not (15 <= len(compact) <= 34) or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    digits = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(digits) % 97 == 1


def _mask_iban_match(match: re.Match[str]) -> str:
    # A printed IBAN followed by an unrelated short word ("... 0130 00 AB") is matched
    # one group too long; dropping trailing groups finds the real one.
    candidate, rest = match.group(0), ""
    while True:
        if is_valid_iban(candidate):
            return mask_iban(candidate) + rest
        head, sep, tail = candidate.rpartition(" ")
        if not sep:
            return match.group(0)
        candidate, rest = head, f" {tail}{rest}"


def _compact(value: Any) -> str:
    return "".join(str(value).split()).upper()


def _normal(key: str) -> str:
    return str(key).strip().lower().replace("-", "_").replace(" ", "_")
