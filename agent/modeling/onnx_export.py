"""LightGBM → ONNX export shared by every model we ship, and the parity check that guards it.

onnxmltools' `convert_lightgbm` writes a TreeEnsembleRegressor with float32 thresholds
(interfaces.md §6.1–6.2); opset 15 is the highest it supports. The graph gets a fixed name:
the converter's default is a random UUID, which would make regenerated files differ.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
import onnxmltools
import onnxruntime as ort
from onnxmltools.convert.common.data_types import FloatTensorType

ONNX_OPSET = 15
PARITY_MAX_REL_ERROR = 1e-4


def export_onnx(
    model: lgb.LGBMRegressor, path: Path, n_features: int, name: str, exp_output: bool = False
) -> None:
    """Write `model` with one float32 input named `input` of `n_features` columns.

    With `exp_output` the graph ends with Exp: a model trained on log(target) then outputs the
    target itself, so the runtime needs no knowledge of the transform.
    """
    proto = onnxmltools.convert_lightgbm(
        model,
        name=name,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset=ONNX_OPSET,
        zipmap=False,
    )
    if exp_output:
        (log_output,) = proto.graph.output
        proto.graph.node.append(onnx.helper.make_node("Exp", [log_output.name], ["exp_" + log_output.name]))
        proto.graph.output.pop()
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info("exp_" + log_output.name, onnx.TensorProto.FLOAT, [None, 1])
        )
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """The exported model's output on rows `x`, fed as float32 exactly as the runtime does."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0].ravel().astype(np.float64)


def onnx_parity(model: lgb.LGBMRegressor, path: Path, x: np.ndarray, exp_output: bool = False) -> float:
    """Largest relative difference between onnxruntime and LightGBM on rows `x`."""
    lgb_pred = np.exp(model.predict(x)) if exp_output else model.predict(x)
    return float(np.max(np.abs(onnx_predict(path, x) - lgb_pred) / np.abs(lgb_pred)))


def provenance() -> dict[str, Any]:
    """The `versions` and `created` entries every model card carries."""
    return {
        "versions": {
            "python": platform.python_version(),
            "lightgbm": lgb.__version__,
            "onnxmltools": onnxmltools.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
