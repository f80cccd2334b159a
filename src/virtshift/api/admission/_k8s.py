"""The few apimachinery validation helpers KubeVirt's webhooks call, with their messages.

Equivalent to ``k8s.io/apimachinery/pkg/util/validation`` (``IsDNS1123Label``,
``IsDNS1123Subdomain``, ``IsValidPortName``) and KubeVirt's PCI address parser.
"""

from __future__ import annotations

import re

_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL = re.compile(f"^{_LABEL_FMT}$")
_SUBDOMAIN_FMT = _LABEL_FMT + r"(\." + _LABEL_FMT + ")*"
_SUBDOMAIN = re.compile(f"^{_SUBDOMAIN_FMT}$")
_PORT_NAME_CHARS = re.compile("^[-a-z0-9]+$")
_HAS_LETTER = re.compile("[a-z]")
_PCI_ADDRESS = re.compile(r"^([\da-fA-F]{4}):([\da-fA-F]{2}):([\da-fA-F]{2})\.([0-7])$")

LABEL_MAX = 63
SUBDOMAIN_MAX = 253


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    parts = "".join((" or " if i else "") + f"'{e}', " for i, e in enumerate(examples))
    return f"{msg} (e.g. {parts}regex used for validation is '{fmt}')"


def _max_len_error(n: int) -> str:
    return f"must be no more than {n} characters"


def is_dns1123_label(value: str) -> bool:
    """Whether ``value`` matches the RFC 1123 label pattern (its length aside)."""
    return _LABEL.match(value) is not None


def dns1123_label(value: str) -> list[str]:
    """Error messages for ``value`` as an RFC 1123 label (empty when valid)."""
    errs: list[str] = []
    if len(value) > LABEL_MAX:
        errs.append(_max_len_error(LABEL_MAX))
    if not _LABEL.match(value):
        errs.append(_regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
            "'-', and must start and end with an alphanumeric character",
            _LABEL_FMT, "my-name", "123-abc",
        ))
    return errs


def dns1123_subdomain(value: str) -> list[str]:
    errs: list[str] = []
    if len(value) > SUBDOMAIN_MAX:
        errs.append(_max_len_error(SUBDOMAIN_MAX))
    if not _SUBDOMAIN.match(value):
        errs.append(_regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character",
            _SUBDOMAIN_FMT, "example.com",
        ))
    return errs


def is_valid_port_name(name: str) -> bool:
    """An IANA_SVC_NAME: 1-15 chars of ``[-a-z0-9]``, one letter, no edge or double hyphen."""
    return (
        0 < len(name) <= 15
        and bool(_PORT_NAME_CHARS.match(name))
        and bool(_HAS_LETTER.search(name))
        and "--" not in name
        and not name.startswith("-")
        and not name.endswith("-")
    )


def is_pci_address(value: str) -> bool:
    return bool(_PCI_ADDRESS.match(value))
