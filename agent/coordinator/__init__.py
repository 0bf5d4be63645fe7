"""The coordinator: sizes a model's tensor-parallel engine from load, through a scale backend.

`service.Coordinator` runs `agent.control.scaling` every period on the arrival rate the serving
engine's sidecar reports (`load`), and carries its decisions out through a `backend.ScaleBackend`
(Kubernetes Deployments and a Service, or local processes).
"""
