"""The functional core: control decisions from data, with no I/O and no clock reads."""
