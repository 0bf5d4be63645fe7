"""The emulated world: GPU, engine, latency, power and memory models, and the per-iteration step.

The twin knows nothing of clock policies: `agent.sim` drives it in virtual time and
`agent.twin.server` serves it in real time as Triton does, both through `agent.twin.step`.
"""
