"""The node agent (`throttllem node`): the one privileged process that steers a node's GPUs.

    settings.py       THROTTLLEM_NODE_* variables
    protocol.py       newline-delimited JSON over the Unix socket (the wire format)
    leases.py         one holder per GPU, lapsing after a TTL (pure)
    peers.py          the peer's PID (SO_PEERCRED) and pod UID (its cgroup)
    pod_resources.py  the kubelet's pod-resources API: which GPUs each pod holds
    authorize.py      which GPUs a sidecar may lease
    gpu_backends.py   NVML or twin GPUs, with the power-limit knob and the MIG check
    server.py         the agent: accept, lease, lapse, reset

The sidecar's side is `agent.gpus.node_agent.NodeAgentActuator`.
"""
