"""The virtual-time shell: the control core driven over the twin, as `agent.sidecar` drives it live.

`loop` replays requests through the twin under a policy; `results` summarises a run;
`capacity` measures an engine's peak rate; `policies` builds any policy for a twin setup, with
`exact_model`, the twin's exact time model, for `throttllem-exact`.
"""
