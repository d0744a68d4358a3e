"""Request checks shared by the CSI services, answering the codes the spec's tables name."""

from __future__ import annotations

from typing import Any, NoReturn

from grpclib.const import Status
from grpclib.exceptions import GRPCError


def fail(status: Status, message: str) -> NoReturn:
    raise GRPCError(status, message)


def invalid(message: str) -> NoReturn:
    fail(Status.INVALID_ARGUMENT, message)


def require(request: Any, *names: str) -> None:
    """INVALID_ARGUMENT "<field> missing in request" for the first empty required field."""
    for name in names:
        if not _present(request, name):
            invalid(f"{name} missing in request")


def _present(request: Any, name: str) -> bool:
    field = request.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:  # repeated fields and maps: present when not empty
        return len(getattr(request, name)) > 0
    if field.message_type is not None:
        return request.HasField(name)
    return bool(getattr(request, name))
