"""LeaseTable: one holder per GPU, all-or-none grants, lapse after the TTL (time passed in)."""

import pytest

from agent.node.leases import LeaseRefused, LeaseTable

A, B, C = "GPU-aaaa", "GPU-bbbb", "GPU-cccc"


def test_grant_then_release_frees_the_gpus():
    table = LeaseTable(ttl_s=1.0)
    lease = table.grant(1, "pod ns/a", (A, B), now_s=0.0)
    assert lease.gpus == (A, B) and table.holds(1, A) and table.holds(1, B)
    assert table.release(1) is lease
    assert not table.holds(1, A) and table.leases() == []
    assert table.release(1) is None  # twice is harmless
    table.grant(2, "pod ns/b", (A,), now_s=0.0)  # free again
    assert table.holds(2, A)


def test_a_second_holder_is_refused_naming_the_first_and_gets_nothing():
    table = LeaseTable(ttl_s=1.0)
    table.grant(1, "pod ns/a", (A,), now_s=0.0)
    with pytest.raises(LeaseRefused, match=r"GPU-aaaa is leased to pod ns/a"):
        table.grant(2, "pod ns/b", (C, A), now_s=0.0)
    assert not table.holds(2, C)  # all or none: C was not taken either
    assert [lease.holder for lease in table.leases()] == [1]


def test_one_holder_cannot_stack_leases():
    table = LeaseTable(ttl_s=1.0)
    table.grant(1, "pod ns/a", (A,), now_s=0.0)
    with pytest.raises(LeaseRefused, match="already leases GPU-aaaa"):
        table.grant(1, "pod ns/a", (B,), now_s=0.0)


def test_a_lease_lapses_only_after_the_ttl_without_renewal():
    table = LeaseTable(ttl_s=1.0)
    table.grant(1, "pod ns/a", (A,), now_s=10.0)
    table.grant(2, "pod ns/b", (B,), now_s=10.0)
    table.renew(2, now_s=10.8)
    assert table.lapsed(now_s=11.0) == []  # exactly the TTL: not yet
    lapsed = table.lapsed(now_s=11.01)
    assert [lease.holder for lease in lapsed] == [1]
    assert not table.holds(1, A) and table.holds(2, B)
    assert [lease.holder for lease in table.lapsed(now_s=11.81)] == [2]
    table.renew(2, now_s=12.0)  # renewing a lapsed holder grants nothing back
    assert table.leases() == []


def test_the_ttl_must_be_positive():
    with pytest.raises(ValueError):
        LeaseTable(ttl_s=0.0)
