"""A client of the directory: phone, operator code, tag and timezone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chalicelib.errors import Conflict, NotFound

# ASCII digits only: `\d` (Python's re and pydantic's patterns alike) also matches Arabic-Indic
# or full-width digits, which `int()` then turns into a different number at the gateway.
PHONE_PATTERN = "^7[0-9]{10}$"
OPERATOR_CODE_PATTERN = "^[0-9]{3}$"
_PHONE = re.compile(PHONE_PATTERN, re.ASCII)
_OPERATOR_CODE = re.compile(OPERATOR_CODE_PATTERN, re.ASCII)


def is_phone(value: object) -> bool:
    """A phone number as clients have them: 7XXXXXXXXXX, ASCII digits."""
    return isinstance(value, str) and _PHONE.fullmatch(value) is not None


def is_operator_code(value: object) -> bool:
    """An operator code: three ASCII digits."""
    return isinstance(value, str) and _OPERATOR_CODE.fullmatch(value) is not None


def default_operator_code(phone: str) -> str:
    """Digits 2-4 of a 7XXXXXXXXXX number: the operator code when none is given."""
    return phone[1:4]


@dataclass(frozen=True)
class ClientFields:
    """What a caller sets on a client; `operator_code=None` means "derive from the phone"."""

    phone: str
    operator_code: str | None
    tag: str
    timezone: str
    opted_out: bool = False


@dataclass(frozen=True)
class Client:
    """A client; `version` is the revision it was read at (0: never stored), so a write of a
    client read earlier fails instead of undoing a change made since."""

    id: str
    phone: str
    operator_code: str
    tag: str
    timezone: str
    created_at: datetime
    updated_at: datetime
    opted_out: bool = False
    version: int = 0

    @classmethod
    def new(cls, client_id: str, fields: ClientFields, now: datetime) -> Client:
        """A client not stored yet."""
        return cls(client_id, "", "", "", "UTC", now, now).with_fields(fields, now)

    def with_fields(self, fields: ClientFields, now: datetime) -> Client:
        """This client with every field set as given (the operator code derived if not given)."""
        return Client(
            id=self.id,
            phone=fields.phone,
            operator_code=fields.operator_code or default_operator_code(fields.phone),
            tag=fields.tag,
            timezone=fields.timezone,
            created_at=self.created_at,
            updated_at=now,
            opted_out=fields.opted_out,
            version=self.version,
        )

    @property
    def fields(self) -> ClientFields:
        """The client's fields as they are: what a PATCH starts from."""
        return ClientFields(
            phone=self.phone,
            operator_code=self.operator_code,
            tag=self.tag,
            timezone=self.timezone,
            opted_out=self.opted_out,
        )


@dataclass(frozen=True)
class Recipient:
    """A client as a mailing's fan-out needs it: a message is made of its id and phone."""

    client_id: str
    phone: str


def client_problem(phone: object, operator_code: object, timezone: object) -> str | None:
    """What makes a stored client unusable for sending (corrupt or older schema), if anything."""
    problems = []
    if not is_phone(phone):
        problems.append("phone is not 7XXXXXXXXXX")
    if not is_operator_code(operator_code):
        problems.append("operator code is not 3 digits")
    try:
        ZoneInfo(timezone)  # type: ignore[arg-type]
    except (ValueError, TypeError, ZoneInfoNotFoundError):
        problems.append("timezone is missing or unknown")
    if not problems:
        return None
    return "client record is corrupt: " + ", ".join(problems)


class ClientNotFound(NotFound):
    """No client has this id."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"client {client_id} not found")


class PhoneTaken(Conflict):
    """Another client has the phone number: phone numbers are unique."""

    def __init__(self, phone: str) -> None:
        super().__init__(
            f"another client already has phone {phone}",
            [{"field": "body.phone", "message": "already in use", "type": "unique"}],
        )


class ClientChanged(Conflict):
    """The client was changed or deleted by another request since it was read."""
