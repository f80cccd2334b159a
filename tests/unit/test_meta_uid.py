"""metadata.uid generation (virtshift.apiserver.meta.new_uid)."""

from __future__ import annotations

import os
import uuid

from virtshift.apiserver import meta


def test_uids_are_random_version_4_uuids() -> None:
    uids = [meta.new_uid() for _ in range(5000)]  # several refills of the random pool
    assert len(set(uids)) == len(uids)
    for u in uids:
        parsed = uuid.UUID(u)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == u


def test_a_forked_child_does_not_repeat_the_parents_uids() -> None:
    meta.new_uid()  # the pool now holds random bytes the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, meta.new_uid().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child != meta.new_uid() and uuid.UUID(child).version == 4
