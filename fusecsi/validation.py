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
        present = request.HasField(name) if _is_message(request, name) else getattr(request, name)
        if not present:
            invalid(f"{name} missing in request")


def _is_message(request: Any, name: str) -> bool:
    field = request.DESCRIPTOR.fields_by_name[name]
    return field.message_type is not None and not _is_map_or_repeated(field)


def _is_map_or_repeated(field: Any) -> bool:
    return field.label == field.LABEL_REPEATED
