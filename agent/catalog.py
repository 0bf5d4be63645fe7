"""The GPUs and models throttllem knows, from datasheets and model configs.

Sources: NVIDIA A100/H100 datasheets (bandwidth, bf16 dense peak, TDP); idle power with a CUDA
context from "Model Parking Tax" (arXiv 2605.23918: A100 80.0 W, H100 121.7 W); model dimensions
from each Hugging Face repository's config.json.

Supported clocks: NVML lists A100 SXM4 SM clocks from 1410 MHz down in 15 MHz steps. The floor of
210 MHz is commonly quoted but not verified; H100 SXM5 is assumed to use the same 15 MHz grid from
1980 MHz down to the same assumed floor. Frequency behaviour is measured (Perseus) only from
855 MHz up on the A100; below that the twin extrapolates (see `twin/frequency.py`).

Power limit constraints (min; the max is the TDP), as `nvidia-smi -q -d POWER` prints
nvmlDeviceGetPowerManagementLimitConstraints:
- A100-SXM4-80GB: 100..400 W, "Min/Max Power Limit" of an NVIDIA A100-SXM4-80GB, driver
  525.60.13 (huggingface/m4-logs@7a31dce, under `tr_141-hanging/`:
  `tr_141_cm409xPMD01_scale_leap_of_faith_v5_num_workers_0-try3/README.md`).
- A100-SXM4-40GB: 100..400 W, an `nvidia-smi -q` dump of eight NVIDIA A100-SXM4-40GB, driver
  535.129.03, quoted in a public blog post whose repository the search index does not name; the
  same board family as the 80 GB part, which agrees.
- H100 SXM5: 200..700 W. NVIDIA's DGX user guides, "Managing Power Capping", show an HGX GPU's
  Redfish `PowerLimitWatts` as AllowableMin 200, AllowableMax 700, DefaultSetPoint 700 (seen in
  the DGX B200 manual's copy of the chapter; the DGX H100/H200 guide has the same chapter); NVIDIA
  DPS's `dpsctl check metrics` example gives min_limit 200, max_limit 700 per GPU; and an
  `nvidia-smi -pl` refusal on a 700 W board in stackhpc/ansible-slurm-appliance#975 reads "should
  be between 200.00 W and 700.00 W". No source names the exact H100 SXM5 80GB part.
"""

from __future__ import annotations

from agent.domain import GpuSpec, ModelSpec

GIB = 1024**3
ASSUMED_CLOCK_FLOOR_MHZ = 210  # unverified floor, see module docstring
CLOCK_STEP_MHZ = 15
# Lowest clock profiled and controlled: energy savings flatten out well above it.
DEFAULT_MIN_CLOCK_MHZ = 600


def _clock_grid(max_mhz: int) -> tuple[int, ...]:
    return tuple(range(max_mhz, ASSUMED_CLOCK_FLOOR_MHZ - 1, -CLOCK_STEP_MHZ))


GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            name="a100-sxm4-80gb",
            product_name="NVIDIA A100-SXM4-80GB",
            sm_clocks_mhz=_clock_grid(1410),
            memory_bytes=80 * GIB,
            hbm_bandwidth_bytes_s=2.039e12,
            peak_bf16_flops=312e12,
            tdp_w=400.0,
            min_power_limit_w=100.0,
            idle_w=80.0,
            calibrated_clock_floor_mhz=855,
        ),
        GpuSpec(
            name="a100-sxm4-40gb",
            product_name="NVIDIA A100-SXM4-40GB",
            sm_clocks_mhz=_clock_grid(1410),
            memory_bytes=40 * GIB,
            hbm_bandwidth_bytes_s=1.555e12,
            peak_bf16_flops=312e12,
            tdp_w=400.0,
            min_power_limit_w=100.0,
            idle_w=80.0,
            calibrated_clock_floor_mhz=855,
        ),
        GpuSpec(
            name="h100-sxm5-80gb",
            product_name="NVIDIA H100 80GB HBM3",
            sm_clocks_mhz=_clock_grid(1980),
            memory_bytes=80 * GIB,
            hbm_bandwidth_bytes_s=3.35e12,
            peak_bf16_flops=989e12,
            tdp_w=700.0,
            min_power_limit_w=200.0,
            idle_w=121.7,
            # No public H100 clock sweep: the A100 response is reused on the normalised clock
            # f/f_max, so 855/1410 of 1980 MHz is the lowest point it is anchored to.
            calibrated_clock_floor_mhz=1200,
        ),
    )
}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="llama2-7b",
            hf_name="meta-llama/Llama-2-7b-hf",
            layers=32,
            hidden=4096,
            heads=32,
            kv_heads=32,
            intermediate=11008,
            vocab=32000,
            max_context_tokens=4096,
        ),
        ModelSpec(
            name="llama3-8b",
            hf_name="meta-llama/Meta-Llama-3-8B",
            layers=32,
            hidden=4096,
            heads=32,
            kv_heads=8,
            intermediate=14336,
            vocab=128256,
            max_context_tokens=8192,
        ),
        ModelSpec(
            name="llama2-13b",
            hf_name="meta-llama/Llama-2-13b-hf",
            layers=40,
            hidden=5120,
            heads=40,
            kv_heads=40,
            intermediate=13824,
            vocab=32000,
            max_context_tokens=4096,
        ),
        ModelSpec(
            name="llama2-70b",
            hf_name="meta-llama/Llama-2-70b-hf",
            layers=80,
            hidden=8192,
            heads=64,
            kv_heads=8,
            intermediate=28672,
            vocab=32000,
            max_context_tokens=4096,
        ),
        ModelSpec(
            name="llama3-70b",
            hf_name="meta-llama/Meta-Llama-3-70B",
            layers=80,
            hidden=8192,
            heads=64,
            kv_heads=8,
            intermediate=28672,
            vocab=128256,
            max_context_tokens=8192,
        ),
    )
}


class UnknownSpecError(ValueError):
    """A GPU or model name that is not in the catalog."""


def gpu_spec(name: str) -> GpuSpec:
    """The GPU called `name`, or an error listing the known ones."""
    try:
        return GPUS[name]
    except KeyError:
        raise UnknownSpecError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}") from None


def model_spec(name: str) -> ModelSpec:
    """The model called `name`, or an error listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownSpecError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
