"""The metadata validator's shortcut for label and annotation keys only skips keys that the
full check accepts."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtshift.apiserver.meta import _QUALIFIED_KEY, _validate_qualified_key

_ALPHABET = "abcAZ09-_./\n x\u00e9"


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=70))
@example("kubevirt.io/vm")
@example("app")
@example("a/b/c")
@example("abc\n")
@example("abc\n/x")
@example("a." * 30 + "b/x")
def test_shortcut_accepts_only_what_the_full_check_accepts(key: str) -> None:
    if len(key) <= 63 and _QUALIFIED_KEY.fullmatch(key) is not None:
        assert _validate_qualified_key(key, "metadata.labels") == []


@settings(max_examples=1000, deadline=None)
@given(st.from_regex(r"\A([a-z0-9]{1,5}(\.[a-z0-9]{1,5}){0,3}/)?[A-Za-z0-9][-A-Za-z0-9_.]{0,20}[A-Za-z0-9]\Z"))
def test_shortcut_takes_common_keys(key: str) -> None:
    assert _validate_qualified_key(key, "metadata.labels") == []
    assert _QUALIFIED_KEY.fullmatch(key) is not None
