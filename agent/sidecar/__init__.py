"""The live sidecar: gateway, control loop, watchdog and its own HTTP port."""
