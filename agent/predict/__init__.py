"""Runtime predictors used by the control core: IPS model (ONNX) and generation lengths."""
