"""`bench faults`: break a running stack on purpose, on loopback with real processes, and judge it."""
