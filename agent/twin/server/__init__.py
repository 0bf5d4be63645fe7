"""A Triton-compatible server in front of the real-time twin (`throttllem twin serve`).

It answers like Triton with the TensorRT-LLM backend serving the stock `ensemble`: the same
HTTP API (health, metadata, generate, generate_stream), the same metrics on the metrics port,
and a GPU control endpoint standing in for NVML clock locking. Modules, one job each:

    realtime.py     the engine loop against a (scaled) wall clock; token delivery
    meter.py        energy, power and utilisation of the twin GPU at any instant
    protocol.py     generate request parsing, response bodies, metadata documents
    http_api.py     the HTTP port's routes
    gpu_control.py  /twin/v1/gpu: lock, unlock and read the twin GPU
    exposition.py   Prometheus text exactly as Triton's prometheus-cpp writes it
    metrics.py      the metric families and the metrics port
    collectors.py   Triton's pollers and request counters that feed the metrics; trtllm-serve's
                    iteration stats queue
    app.py          assembly, task supervision, start-up and shutdown
"""
