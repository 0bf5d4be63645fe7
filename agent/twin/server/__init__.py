"""A Triton-, vLLM- or trtllm-serve-like server in front of the real-time twin (`throttllem twin serve`).

By default it answers like Triton with the TensorRT-LLM backend serving the stock `ensemble`:
the same HTTP API (health, metadata, generate, generate_stream), the same metrics on the
metrics port. With `--api vllm` or `--api trtllm-serve` the HTTP port is that server's
OpenAI-compatible API with its own `/metrics`. Every API has a GPU control endpoint standing in
for NVML clock locking. Modules, one job each:

    realtime.py     the engine loop against a (scaled) wall clock; token delivery
    meter.py        energy, power and utilisation of the twin GPU at any instant
    protocol.py     generate request parsing, response bodies, metadata documents
    http_api.py     the HTTP port's routes as Triton
    triton_config.py    the ensemble's model configuration and the repository index
    triton_stats.py     the statistics extension, counted from what was served
    kserve_infer.py     KServe v2 infer with JSON and binary tensor data
    gpu_control.py  /twin/v1/gpu: lock, unlock and read the twin GPU
    exposition.py   Prometheus text exactly as Triton's prometheus-cpp writes it
    metrics.py      the metric families and the metrics port
    collectors.py   Triton's pollers and request counters that feed the metrics; trtllm-serve's
                    iteration stats queue
    openai_protocol.py  OpenAI completions and chat requests, and vLLM's and trtllm-serve's answers
    openai_api.py   the HTTP port's routes as vLLM or trtllm-serve
    vllm_metrics.py vLLM's Prometheus families, counted per engine step
    app.py          assembly, task supervision, start-up and shutdown
"""
