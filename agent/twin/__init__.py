"""The emulated world: an engine of TP N on N GPUs, its latency, power and memory, and one step.

The twin knows nothing of clock policies: `agent.sim` drives it in virtual time and
`agent.twin.server` serves it in real time as Triton does, both through `agent.twin.step`.
`agent.twin.validation` holds it to the published step times it is calibrated against.
"""
