"""Peers' clock policies, reimplemented on throttllem's core inputs.

Each module here re-expresses one published system's control law (EcoFreq, GreenLLM, …) with
what the functional core already has — a `ControlView`, the IPS-based `IterationTimeModel`, the
SLO targets and the GPU's clocks — so that the simulator and the live sidecar can run the peers
side by side with our own policies; each module's docstring cites its source and labels what had
to be reconstructed or adapted.
"""
