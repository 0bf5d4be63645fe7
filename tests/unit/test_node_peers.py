"""Peer identity: SO_PEERCRED on a real Unix socket, pod UIDs in cgroup v1/v2 paths of both drivers."""

import os
import socket

import pytest

from agent.node.peers import peer_pid, pod_uid_from_cgroup, pod_uid_of

UID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"

CGROUP_V1_CGROUPFS = f"""12:pids:/kubepods/burstable/pod{UID}/0123abcd
11:memory:/kubepods/burstable/pod{UID}/0123abcd
1:name=systemd:/kubepods/burstable/pod{UID}/0123abcd
"""
CGROUP_V1_GUARANTEED = f"4:cpu,cpuacct:/kubepods/pod{UID}/0123abcd\n"
CGROUP_V2_SYSTEMD = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-0123abcd.scope\n"
)
CGROUP_V2_SYSTEMD_GUARANTEED = (
    f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-0123.scope\n"
)
CGROUP_V2_CGROUPFS = f"0::/kubepods/besteffort/pod{UID}/0123abcd\n"


@pytest.mark.parametrize(
    "text",
    [
        CGROUP_V1_CGROUPFS,
        CGROUP_V1_GUARANTEED,
        CGROUP_V2_SYSTEMD,
        CGROUP_V2_SYSTEMD_GUARANTEED,
        CGROUP_V2_CGROUPFS,
    ],
    ids=["v1-cgroupfs", "v1-guaranteed", "v2-systemd", "v2-systemd-guaranteed", "v2-cgroupfs"],
)
def test_the_pod_uid_is_read_from_every_layout(text):
    assert pod_uid_from_cgroup(text) == UID


@pytest.mark.parametrize(
    "text",
    [
        "0::/user.slice/user-1000.slice/session-3.scope\n",  # a host process
        "0::/system.slice/containerd.service\n",
        "0::/kubepods.slice/podcast-player.scope\n",  # "pod" in a name, no UID
        "",
    ],
)
def test_a_process_outside_any_pod_has_no_uid(text):
    assert pod_uid_from_cgroup(text) is None


def test_paths_naming_two_pods_are_refused():
    other = "00000000-1111-2222-3333-444444444444"
    with pytest.raises(ValueError, match="several pods"):
        pod_uid_from_cgroup(f"0::/kubepods/pod{UID}/a\n1:cpu:/kubepods/pod{other}/b\n")


def test_pod_uid_of_reads_the_process_cgroup_file(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(CGROUP_V2_SYSTEMD)
    assert pod_uid_of(4242, tmp_path) == UID
    with pytest.raises(OSError):
        pod_uid_of(4243, tmp_path)  # the process is gone


def test_so_peercred_gives_the_peer_pid():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_pid(left) == os.getpid()
