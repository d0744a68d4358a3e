"""The cluster token every role loads the same way: `--token-file`, else $FUSECSI_TOKEN."""

from __future__ import annotations

import os

TOKEN_ENV = "FUSECSI_TOKEN"


def load_token(token_file: str | None) -> str | None:
    """The token from `token_file`, else from $FUSECSI_TOKEN; None when neither is set.

    A token file that is given but empty is a ValueError (one line): it is a mistake in a
    secret's mount, and running without a token would hide it until the first refusal.
    """
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None
