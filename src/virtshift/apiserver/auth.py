"""Bearer-token authentication: every request must carry a known token; no anonymous user."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from virtshift.apiserver.pki import new_token

ADMIN_USER = "virtshift-admin"
ADMIN_GROUPS = ("system:masters", "system:authenticated")
COMPONENTS_GROUP = "system:serviceaccounts:kubevirt"
"""The group of virtshift's controllers and node agents (KubeVirt's service accounts)."""


@dataclass(frozen=True)
class UserInfo:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict, compare=False, hash=False)


COMPONENT_USER = UserInfo("system:serviceaccount:kubevirt:kubevirt-controller", "",
                          ("system:masters", "system:serviceaccounts", COMPONENTS_GROUP,
                           "system:authenticated"))


def is_component(user: UserInfo) -> bool:
    return COMPONENTS_GROUP in user.groups


@functools.lru_cache(maxsize=256)
def _digest(token: str) -> str:
    """The key a token is kept under (cached: every request hashes its bearer token)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuthenticator:
    """Tokens are kept hashed in ``tokens.json``; the admin token is also in the kubeconfig."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, UserInfo] = {}
        if path.exists():
            for entry in json.loads(path.read_text()):
                self._users[entry["sha256"]] = UserInfo(
                    entry["username"], entry.get("uid", ""), tuple(entry.get("groups", []))
                )

    def _save(self) -> None:
        data = [
            {"sha256": d, "username": u.username, "uid": u.uid, "groups": list(u.groups)}
            for d, u in self._users.items()
        ]
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def issue(self, user: UserInfo) -> str:
        token = new_token()
        self._users[_digest(token)] = user
        self._save()
        return token

    def authenticate(self, token: str) -> UserInfo | None:
        return self._users.get(_digest(token))
