"""Random ids from a buffer of the system's random bytes (stox/ids.py)."""

from __future__ import annotations

import os
import uuid
import warnings

from stox import ids


def test_ids_are_version_4_uuids_and_never_repeat_across_buffers() -> None:
    made = [ids.new_id() for _ in range(3 * ids._CHUNK // 16 + 7)]  # several refills
    assert len(set(made)) == len(made)
    for text in made[:300]:
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == text


def test_a_forked_child_does_not_reuse_the_parents_bytes() -> None:
    ids.random16()  # the parent's buffer holds unused bytes now
    read, write = os.pipe()
    with warnings.catch_warnings():  # "multi-threaded, fork() may deadlock": the child only writes
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: what it takes next, sent to the parent
        os.write(write, ids.random16())
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.waitpid(pid, 0)
    assert child != ids.random16()
