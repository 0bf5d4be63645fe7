"""Offline model building: profiling sweeps, datasets, training and ONNX export."""
