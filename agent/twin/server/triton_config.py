"""The ensemble's model configuration and the model repository, as Triton reports them.

`GET v2/models/<m>/config` answers the model's `ModelConfig` protobuf as JSON the way
`core:src/model_config_utils.cc` (`ModelConfigToJson`) prints it: proto field names, every
scalar, list and map field even when empty, unset message fields left out, fields in the
proto's declaration order (`common:protobuf/model_config.proto` as of Triton 2.45), int64
fields as numbers. What Triton adds on load is there too: the version policy (latest 1) and
`model_transaction_policy.decoupled`, which an ensemble takes from its steps
(`core:src/ensemble_scheduler/ensemble_utils.cc`): true when `tensorrt_llm` is decoupled.

The inputs and outputs come from `ENSEMBLE_INPUTS` / `ENSEMBLE_OUTPUTS`; the steps from the
stock `TensorRT-LLM:triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt@2a9abd9`,
whose `max_batch_size` (`${triton_max_batch_size}`) is the engine's.

The repository holds the ensemble and its three composing models (`POST v2/repository/index`),
loaded at start as Triton's default model control mode does; load and unload are refused as that
mode refuses them.
"""

from __future__ import annotations

from typing import Any

from agent.twin.server.metrics import TRT_LLM_MODEL
from agent.twin.server.protocol import ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, MODEL_VERSION, REQUIRED_INPUTS

PREPROCESSING_MODEL = "preprocessing"
POSTPROCESSING_MODEL = "postprocessing"
COMPOSING_MODELS = (PREPROCESSING_MODEL, TRT_LLM_MODEL, POSTPROCESSING_MODEL)
# Inputs the stock config marks `allow_ragged_batch: true`.
RAGGED_INPUTS = frozenset(
    {"lora_weights", "lora_config", "guided_decoding_guide_type", "guided_decoding_guide"}
)
# The model control mode's refusal (`core:src/model_repository_manager/model_repository_manager.cc`).
MODEL_CONTROL_ERROR = "explicit model load / unload is not allowed if polling is enabled"

_TensorMap = tuple[tuple[str, str], ...]  # (composing model's tensor, ensemble tensor)

# (model, input_map, output_map) of each step, in the stock config's order.
ENSEMBLE_STEPS: tuple[tuple[str, _TensorMap, _TensorMap], ...] = (
    (
        PREPROCESSING_MODEL,
        (
            ("QUERY", "text_input"),
            ("DECODER_QUERY", "decoder_text_input"),
            ("REQUEST_OUTPUT_LEN", "max_tokens"),
            ("BAD_WORDS_DICT", "bad_words"),
            ("STOP_WORDS_DICT", "stop_words"),
            ("EMBEDDING_BIAS_WORDS", "embedding_bias_words"),
            ("EMBEDDING_BIAS_WEIGHTS", "embedding_bias_weights"),
            ("END_ID", "end_id"),
            ("PAD_ID", "pad_id"),
            ("PROMPT_TABLE_EXTRA_ID", "prompt_table_extra_id"),
        ),
        (
            ("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"),
            ("INPUT_ID", "_INPUT_ID"),
            ("REQUEST_DECODER_INPUT_LEN", "_REQUEST_DECODER_INPUT_LEN"),
            ("DECODER_INPUT_ID", "_DECODER_INPUT_ID"),
            ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"),
            ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
            ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"),
            ("EMBEDDING_BIAS", "_EMBEDDING_BIAS"),
            ("OUT_END_ID", "_PREPROCESSOR_END_ID"),
            ("OUT_PAD_ID", "_PREPROCESSOR_PAD_ID"),
            ("OUT_PROMPT_TABLE_EXTRA_IDS", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
        ),
    ),
    (
        TRT_LLM_MODEL,
        (
            ("input_ids", "_INPUT_ID"),
            ("decoder_input_ids", "_DECODER_INPUT_ID"),
            ("input_lengths", "_REQUEST_INPUT_LEN"),
            ("decoder_input_lengths", "_REQUEST_DECODER_INPUT_LEN"),
            ("exclude_input_in_output", "exclude_input_in_output"),
            ("request_output_len", "_REQUEST_OUTPUT_LEN"),
            ("end_id", "_PREPROCESSOR_END_ID"),
            ("pad_id", "_PREPROCESSOR_PAD_ID"),
            ("embedding_bias", "_EMBEDDING_BIAS"),
            ("runtime_top_k", "top_k"),
            ("runtime_top_p", "top_p"),
            ("temperature", "temperature"),
            ("len_penalty", "length_penalty"),
            ("repetition_penalty", "repetition_penalty"),
            ("min_tokens", "min_tokens"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
            ("seed", "seed"),
            ("return_log_probs", "return_log_probs"),
            ("return_context_logits", "return_context_logits"),
            ("return_generation_logits", "return_generation_logits"),
            ("return_perf_metrics", "return_perf_metrics"),
            ("return_num_input_tokens", "return_num_input_tokens"),
            ("return_num_output_tokens", "return_num_output_tokens"),
            ("num_return_sequences", "num_return_sequences"),
            ("beam_width", "beam_width"),
            ("streaming", "stream"),
            ("prompt_embedding_table", "prompt_embedding_table"),
            ("prompt_vocab_size", "prompt_vocab_size"),
            ("stop_words_list", "_STOP_WORDS_IDS"),
            ("bad_words_list", "_BAD_WORDS_IDS"),
            ("prompt_table_extra_ids", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
            ("lora_task_id", "lora_task_id"),
            ("lora_weights", "lora_weights"),
            ("lora_config", "lora_config"),
            ("guided_decoding_guide_type", "guided_decoding_guide_type"),
            ("guided_decoding_guide", "guided_decoding_guide"),
        ),
        (
            ("output_ids", "_TOKENS_BATCH"),
            ("sequence_length", "_SEQUENCE_LENGTH"),
            *(
                (name, name)
                for name, _, _ in ENSEMBLE_OUTPUTS
                if name != "text_output"  # every other ensemble output comes straight from the engine
            ),
        ),
    ),
    (
        POSTPROCESSING_MODEL,
        (("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")),
        (("OUTPUT", "text_output"),),
    ),
)


def config_data_type(datatype: str) -> str:
    """A KServe datatype as model_config.proto's `DataType` names it (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def ensemble_config(model_name: str, max_batch_size: int, *, decoupled: bool) -> dict[str, Any]:
    """The ensemble's configuration as `GET .../config` returns it."""
    inputs = [
        {
            "name": name,
            "data_type": config_data_type(datatype),
            "format": "FORMAT_NONE",
            "dims": list(dims),
            "is_shape_tensor": False,
            "allow_ragged_batch": name in RAGGED_INPUTS,
            "optional": name not in REQUIRED_INPUTS,
        }
        for name, datatype, dims in ENSEMBLE_INPUTS
    ]
    outputs = [
        {
            "name": name,
            "data_type": config_data_type(datatype),
            "dims": list(dims),
            "label_filename": "",
            "is_shape_tensor": False,
        }
        for name, datatype, dims in ENSEMBLE_OUTPUTS
    ]
    steps = [
        {
            "model_name": model,
            "model_version": -1,
            "input_map": dict(sorted(input_map)),  # protobuf prints map entries sorted by key
            "output_map": dict(sorted(output_map)),
            "model_namespace": "",
        }
        for model, input_map, output_map in ENSEMBLE_STEPS
    ]
    return {
        "name": model_name,
        "platform": "ensemble",
        "backend": "",
        "runtime": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "batch_input": [],
        "batch_output": [],
        "ensemble_scheduling": {"step": steps},
        "instance_group": [],
        "default_model_filename": "",
        "cc_model_filenames": {},
        "metric_tags": {},
        "parameters": {},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": decoupled},
    }


def repository_models(model_name: str) -> list[str]:
    """Every model in the repository, sorted by name as Triton lists them."""
    return sorted({model_name, *COMPOSING_MODELS})


def repository_index(model_name: str, *, ready: bool, ready_only: bool) -> list[dict[str, str]]:
    """`POST v2/repository/index`: each model's one version and its state."""
    if ready_only and not ready:
        return []
    state = {"state": "READY"} if ready else {"state": "UNAVAILABLE", "reason": "unloaded"}
    return [{"name": name, "version": MODEL_VERSION, **state} for name in repository_models(model_name)]
