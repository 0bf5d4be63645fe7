"""KServe v2 inference (`POST v2/models/<m>/infer`) with Triton's binary tensor data extension.

A request body is a JSON header, then the bytes of each binary input in input order; with binary
inputs `Inference-Header-Content-Length` gives the header's length (without it the whole body is
the header). An input carries either `data` (JSON, nested or flat, row-major) or
`parameters.binary_data_size`; binary tensors are little-endian, BOOL one byte per element, and
each BYTES element a 4-byte little-endian length followed by its bytes. Outputs come as JSON
`data` unless asked for as binary, per output (`parameters.binary_data`) or for every output the
request does not list (request parameter `binary_data_output`); binary outputs follow the
response's JSON header in order and the response says the header's length in the same header.

Parsing follows `server:src/http_server.cc` (`HandleInfer`, `ParseJsonTritonIO`,
`FinalizeResponse`), validation against the ensemble `core:src/infer_request.cc` (`Normalize`),
with their messages. Nothing is allocated from a claimed size: the binary sizes must add up to
exactly the bytes after the header, element counts are checked against data already in the body,
and JSON data nests at most `MAX_JSON_DATA_DEPTH` levels.

The twin runs one generation per request, so a request holds one batch entry; its inputs map to
the generate extension's keys (`protocol.generate_params`), and the twin-only `prompt_tokens` and
`output_tokens` come as request parameters (a real Triton passes them to the model, which
ignores them).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.twin.server.protocol import (
    ENSEMBLE_INPUTS,
    ENSEMBLE_OUTPUTS,
    MODEL_VERSION,
    RESPONSE_PARAMETERS,
    TWIN_KEYS,
    BadRequestError,
    OutputTensor,
    dumps,
    parse_json,
)

INFER_HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_DATA_DEPTH = 100  # HTTP_MAX_JSON_NESTING_DEPTH, `server:src/common.h`
INT64_MAX = 2**63 - 1
DECOUPLED_ERROR = "HTTP end point doesn't support models with decoupled transaction policy"
BATCH_NEEDS_DECOUPLED_ERROR = (
    "Batch size > 1 requires the tensorrt_llm backend to be using decoupled transaction policy"
)
# struct codes of the fixed-size datatypes (BF16 has none: its elements are never read)
_STRUCT_CODES = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_ITEM_BYTES = {**{name: struct.calcsize(f"<{code}") for name, code in _STRUCT_CODES.items()}, "BF16": 2}
_INT_RANGES = {
    name: (-(2 ** (8 * _ITEM_BYTES[name] - 1)), 2 ** (8 * _ITEM_BYTES[name] - 1) - 1)
    for name in ("INT8", "INT16", "INT32", "INT64")
} | {name: (0, 2 ** (8 * _ITEM_BYTES[name]) - 1) for name in ("UINT8", "UINT16", "UINT32", "UINT64")}
_DATATYPES = frozenset({*_ITEM_BYTES, "BYTES"})
_CONFIG_INPUTS = {name: (datatype, dims) for name, datatype, dims in ENSEMBLE_INPUTS}
_CONFIG_OUTPUTS = frozenset(name for name, _, _ in ENSEMBLE_OUTPUTS)
_CONTENT_FIELDS_ERROR = (
    "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
    "'shared_memory_region' in 'parameters'. But"
)


class SharedMemoryNotFoundError(BadRequestError):
    """A tensor names a shared memory region; the twin registers none (Triton answers 404)."""


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input as the request gives it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[object, ...] | bytes  # JSON elements, flattened and type-checked; or the binary bytes


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One entry of the request's `outputs`."""

    name: str
    binary: bool


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed request, not yet checked against the model."""

    request_id: str | None
    parameters: dict[str, object]  # the request parameters, Triton's own (`binary_data_output`) removed
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output the model produces
    binary_output: bool  # `binary_data_output`: outputs not listed come as binary


def _prefix(request_id: str | None) -> str:
    """Triton core's request tag at the head of its validation messages."""
    return f"[request id: {request_id or '<id_unknown>'}] "


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequestError(f"Unable to parse {INFER_HEADER_LENGTH}, got: {header_length}") from None
    if not 0 <= length <= len(body):
        raise BadRequestError(
            f"inference header size should be in range (0, {len(body)}), got: {header_length}"
        )
    return body[:length], body[length:]


def parse_infer(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """Parse one request as Triton's HTTP frontend does; raises BadRequestError."""
    header, binary = split_body(body, header_length)
    if header_length is not None and not header:
        raise BadRequestError(
            f"{_prefix(None)}Raw request must only have 1 input (found 1) to be deduced but got "
            f"{len(ENSEMBLE_INPUTS)} inputs in '{model_name}' model configuration"
        )
    document = parse_json(header)
    if not isinstance(document, dict):
        raise BadRequestError("Unable to parse 'inputs': the request header is not a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError("Unable to parse 'id'")
    parameters, binary_output = _request_parameters(document.get("parameters", {}))
    inputs_json = document.get("inputs")
    if not isinstance(inputs_json, list):
        raise BadRequestError("Unable to parse 'inputs'")
    inputs: list[InputTensor] = []
    offset = 0
    for item in inputs_json:
        tensor, offset = _input(item, binary, offset, model_name)
        if any(other.name == tensor.name for other in inputs):
            raise BadRequestError(f"input '{tensor.name}' already exists in request")
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequestError(f"unexpected additional input data for model '{model_name}'")
    outputs_json = document.get("outputs")
    outputs = None if outputs_json is None else _requested_outputs(outputs_json)
    return InferRequest(request_id or None, parameters, tuple(inputs), outputs, binary_output)


def _request_parameters(parameters: object) -> tuple[dict[str, object], bool]:
    if not isinstance(parameters, dict):
        raise BadRequestError("failed to get request params.")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequestError("Unable to parse 'binary_data_output'")
    for key, value in parameters.items():
        if key.startswith("triton_"):
            raise BadRequestError(
                "parameter keys starting with 'triton_' are reserved for Triton usage and should not "
                "be specified."
            )
        if not isinstance(value, bool | int | float | str):
            raise BadRequestError(
                f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'."
            )
    return {k: v for k, v in parameters.items() if k != "binary_data_output"}, binary_output


def _input(item: object, binary: bytes, offset: int, model_name: str) -> tuple[InputTensor, int]:
    """One `inputs` entry and where the next binary input starts."""
    if not isinstance(item, dict):
        raise BadRequestError("Unable to parse 'inputs'")
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError("Unable to parse 'parameters'")
    fields = [
        label
        for label, present in (
            ("'data'", "data" in item),
            ("'binary_data_size'", "binary_data_size" in parameters),
            ("'shared_memory_region'", "shared_memory_region" in parameters),
        )
        if present
    ]
    if len(fields) != 1:
        raise BadRequestError(
            f"{_CONTENT_FIELDS_ERROR} {'set ' + ' '.join(fields) if fields else 'no field is set'}"
        )
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str):
        raise BadRequestError("Unable to parse 'name'")
    if not isinstance(datatype, str):
        raise BadRequestError("Unable to parse 'datatype'")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequestError("Unable to parse 'shape'")
    if datatype not in _DATATYPES:
        raise BadRequestError(f"invalid datatype for input {name}")
    if "shared_memory_region" in parameters:
        raise SharedMemoryNotFoundError(
            f"Unable to find shared memory region: '{parameters['shared_memory_region']}'"
        )
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError("Unable to parse 'binary_data_size'")
        available = len(binary) - offset
        if size > available:
            raise BadRequestError(
                f"unexpected size for input '{name}', expecting {size - available} additional bytes for "
                f"model '{model_name}'"
            )
        return InputTensor(name, datatype, tuple(shape), binary[offset : offset + size]), offset + size
    return InputTensor(name, datatype, tuple(shape), _json_data(name, datatype, shape, item["data"])), offset


def _json_data(name: str, datatype: str, shape: list[int], data: object) -> tuple[object, ...]:
    """A JSON input's elements, flattened, checked against its datatype and shape."""
    if datatype in ("FP16", "BF16"):
        raise BadRequestError(
            f"receiving {datatype} data via JSON is not supported. Please use the binary data format "
            f"for input {name}"
        )
    if not isinstance(data, list):
        raise BadRequestError("Unable to parse 'data'")
    expected = math.prod(shape)
    if expected > INT64_MAX:
        raise BadRequestError(
            f"invalid shape for input '{name}': shape {_shape_text(shape)} causes total element count to "
            f"exceed maximum size of {INT64_MAX}"
        )
    elements: list[object] = []
    open_lists = [iter(data)]  # the lists being walked, outermost first
    while open_lists:
        if len(open_lists) > MAX_JSON_DATA_DEPTH:
            raise BadRequestError(
                "Unable to parse 'data': JSON nesting depth exceeds maximum allowed limit "
                f"({MAX_JSON_DATA_DEPTH})"
            )
        for element in open_lists[-1]:
            if isinstance(element, list):
                open_lists.append(iter(element))
                break
            if len(elements) == expected:
                raise BadRequestError(
                    "Unable to parse 'data': Shape does not match true shape of 'data' field"
                )
            elements.append(_json_element(name, datatype, element))
        else:
            open_lists.pop()
    if len(elements) != expected:
        raise BadRequestError("Failed to parse 'data' field: shape does not match true shape")
    return tuple(elements)


def _json_element(name: str, datatype: str, element: object) -> object:
    """One JSON element of a `datatype` tensor, refused when it is of another kind or out of range."""
    if datatype == "BYTES":
        ok = isinstance(element, str)
    elif datatype == "BOOL":
        ok = isinstance(element, bool)
    elif datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        ok = isinstance(element, int) and not isinstance(element, bool) and low <= element <= high
    else:
        ok = isinstance(element, int | float) and not isinstance(element, bool)
    if not ok:
        raise BadRequestError(
            f"Unable to parse 'data': {element!r} is not a {datatype} value for input '{name}'"
        )
    return element


def _requested_outputs(outputs: object) -> tuple[RequestedOutput, ...]:
    if not isinstance(outputs, list):
        raise BadRequestError("Unable to parse 'outputs'")
    requested = []
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError("Unable to parse 'name'")
        parameters = item.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequestError("Unable to parse 'parameters'")
        if "classification" in parameters:
            raise BadRequestError("the twin does not serve the classification extension")
        if "shared_memory_region" in parameters:
            raise SharedMemoryNotFoundError(
                f"Unable to find shared memory region: '{parameters['shared_memory_region']}'"
            )
        binary = parameters.get("binary_data", False)
        if not isinstance(binary, bool):
            raise BadRequestError("Unable to parse 'binary_data'")
        requested.append(RequestedOutput(item["name"], binary))
    return tuple(requested)


def ensemble_keys(request: InferRequest, model_name: str, max_batch_size: int) -> dict[str, Any]:
    """The request as the generate extension's keys, after Triton's checks against the ensemble.

    Raises BadRequestError: an input or output the model lacks, a batch the model or the
    non-decoupled TensorRT-LLM backend refuses, a datatype, shape or size that does not match.
    """
    tag = _prefix(request.request_id)
    for output in request.outputs or ():
        if output.name not in _CONFIG_OUTPUTS:
            raise BadRequestError(f"unexpected inference output '{output.name}' for model '{model_name}'")
    batch = 0
    for tensor in request.inputs:
        if tensor.name not in _CONFIG_INPUTS:
            raise BadRequestError(f"unexpected inference input '{tensor.name}' for model '{model_name}'")
        if not tensor.shape:
            raise BadRequestError(
                f"{tag}input '{tensor.name}' has no shape but model requires batch dimension for "
                f"'{model_name}'"
            )
        if batch and tensor.shape[0] != batch:
            raise BadRequestError(
                f"{tag}input '{tensor.name}' batch size does not match other inputs for '{model_name}'"
            )
        batch = tensor.shape[0]
    if batch > max_batch_size:
        raise BadRequestError(
            f"{tag}inference request batch-size must be <= {max_batch_size} for '{model_name}'"
        )
    keys: dict[str, Any] = {}
    for tensor in request.inputs:
        _check_against_config(tensor, tag, model_name)
        elements = _elements(tensor, tag, model_name)
        if tensor.name == "text_input":
            elements = tuple(_utf8(e) for e in elements)
        keys[tensor.name] = elements[0] if len(elements) == 1 else list(elements)
    if batch > 1:
        raise BadRequestError(BATCH_NEEDS_DECOUPLED_ERROR)
    if request.request_id is not None:
        keys["id"] = request.request_id
    keys |= {key: request.parameters[key] for key in TWIN_KEYS if key in request.parameters}
    return keys


def _check_against_config(tensor: InputTensor, tag: str, model_name: str) -> None:
    datatype, dims = _CONFIG_INPUTS[tensor.name]
    if tensor.datatype != datatype:
        raise BadRequestError(
            f"{tag}inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
            f"'{model_name}' expects '{datatype}'"
        )
    given = tensor.shape[1:]
    if len(given) != len(dims) or any(want not in (-1, got) for want, got in zip(dims, given, strict=True)):
        raise BadRequestError(
            f"{tag}unexpected shape for input '{tensor.name}' for model '{model_name}'. Expected "
            f"{_shape_text((-1, *dims))}, got {_shape_text(tensor.shape)}. NOTE: Setting a non-zero "
            "max_batch_size in the model config requires a batch dimension to be prepended to each input "
            "shape. If you want to specify the full shape including the batch dim in your input dims "
            "config, try setting max_batch_size to zero. See the model configuration docs for more info "
            "on max_batch_size."
        )


def _elements(tensor: InputTensor, tag: str, model_name: str) -> tuple[object, ...]:
    """The tensor's elements (a binary tensor's decoded, its size checked against its shape)."""
    if not isinstance(tensor.data, bytes):
        return tensor.data
    count = math.prod(tensor.shape)
    where = f"for inference input '{tensor.name}' for model '{model_name}'"
    if tensor.datatype == "BYTES":
        return _bytes_elements(tensor.data, count, tag, where)
    expected = count * _ITEM_BYTES[tensor.datatype]
    if len(tensor.data) != expected:
        raise BadRequestError(
            f"{tag}input byte size mismatch for input '{tensor.name}' for model '{model_name}'. Expected "
            f"{expected}, got {len(tensor.data)}"
        )
    if tensor.datatype == "BF16":
        return (None,) * count  # no input the twin reads is BF16
    return struct.unpack(f"<{count}{_STRUCT_CODES[tensor.datatype]}", tensor.data)


def _bytes_elements(data: bytes, count: int, tag: str, where: str) -> tuple[bytes, ...]:
    """A binary BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise BadRequestError(
                f"{tag}incomplete string length indicator {where}, expecting 4 bytes but only "
                f"{len(data) - offset} bytes available. Please make sure the string length indicator is in "
                "one buffer."
            )
        if len(elements) == count:
            raise BadRequestError(
                f"{tag}unexpected number of string elements {count + 1} {where}, expecting {count}"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        start = offset + 4
        if length > len(data) - start:
            raise BadRequestError(
                f"{tag}element {len(elements)} of {length} bytes runs past the tensor data {where}"
            )
        elements.append(data[start : start + length])
        offset = start + length
    if len(elements) != count:
        raise BadRequestError(f"{tag}expected {count} string elements {where}, got {len(elements)}")
    return tuple(elements)


def _utf8(element: object) -> object:
    """A BYTES element the twin reads as text."""
    if not isinstance(element, bytes):
        return element
    try:
        return element.decode()
    except UnicodeDecodeError:
        raise BadRequestError("unable to parse input 'text_input': expected UTF-8 text") from None


def encode_response(
    model_name: str, request: InferRequest, tensors: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body and, when binary outputs follow the JSON header, the header's length.

    Only the outputs the request lists are sent (all when it lists none), in the model's order.
    """
    if request.outputs is None:
        chosen = [(tensor, request.binary_output) for tensor in tensors]
    else:
        binary = {output.name: output.binary for output in request.outputs}
        chosen = [(tensor, binary[tensor.name]) for tensor in tensors if tensor.name in binary]
    header: dict[str, Any] = {}
    if request.request_id is not None:
        header["id"] = request.request_id
    header |= {"model_name": model_name, "model_version": MODEL_VERSION, "parameters": RESPONSE_PARAMETERS}
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor, as_binary in chosen:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if as_binary:
            raw = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = list(tensor.values)
        outputs.append(entry)
    header["outputs"] = outputs
    encoded = dumps(header, sort_keys=False).encode()
    if not chunks:
        return encoded, None
    return encoded + b"".join(chunks), len(encoded)


def _binary(tensor: OutputTensor) -> bytes:
    """A tensor's elements in the binary tensor data format."""
    if tensor.datatype == "BYTES":
        raw = [str(value).encode() for value in tensor.values]
        return b"".join(struct.pack("<I", len(element)) + element for element in raw)
    return struct.pack(f"<{len(tensor.values)}{_STRUCT_CODES[tensor.datatype]}", *tensor.values)
