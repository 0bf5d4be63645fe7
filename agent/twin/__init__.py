"""The emulated world: GPU, engine, latency and power models, virtual-time simulator."""
