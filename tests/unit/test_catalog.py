import itertools

import pytest

from agent.catalog import GPUS, MODELS, UnknownSpecError, gpu_spec, model_spec
from agent.twin.memory import EngineConfig, ModelDoesNotFitError, kv_cache_blocks


def test_a100_clocks_as_nvml_lists_them():
    clocks = gpu_spec("a100-sxm4-80gb").sm_clocks_mhz
    assert clocks[0] == 1410 and clocks[-1] == 210
    assert len(clocks) == 81
    assert all(a - b == 15 for a, b in itertools.pairwise(clocks))


def test_h100_tops_at_1980():
    assert gpu_spec("h100-sxm5-80gb").max_clock_mhz == 1980


@pytest.mark.parametrize(
    ("name", "billions"),
    [("llama3-8b", 8.03), ("llama2-13b", 13.02), ("llama2-70b", 68.98), ("llama3-70b", 70.55)],
)
def test_parameter_counts_match_published_sizes(name, billions):
    assert model_spec(name).params() / 1e9 == pytest.approx(billions, abs=0.05)


def test_kv_bytes_per_token():
    # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x (K+V) x 2 bytes = 128 KiB per token.
    assert model_spec("llama3-8b").kv_bytes_per_token(1) == 131072
    assert model_spec("llama3-8b").kv_bytes_per_token(2) == 65536
    # Llama-2-13B has no GQA: 40 x 40 x 128 x 2 x 2 = 800 KiB.
    assert model_spec("llama2-13b").kv_bytes_per_token(1) == 819200


def test_weights_split_across_tp():
    m = model_spec("llama2-70b")
    assert m.weight_bytes_per_gpu(4) == pytest.approx(m.weight_bytes_per_gpu(1) / 4, rel=1e-6)


def test_refuses_configs_that_do_not_fit():
    with pytest.raises(ModelDoesNotFitError, match="does not fit on a100-sxm4-40gb"):
        kv_cache_blocks(GPUS["a100-sxm4-40gb"], MODELS["llama2-70b"], 1, EngineConfig())


def test_kv_capacity_is_tight_for_llama2_13b_on_40gb():
    tokens = kv_cache_blocks(GPUS["a100-sxm4-40gb"], MODELS["llama2-13b"], 1, EngineConfig()) * 64
    assert 8_000 < tokens < 30_000  # the paper's capacity-tight configuration
    tp2 = kv_cache_blocks(GPUS["a100-sxm4-40gb"], MODELS["llama2-13b"], 2, EngineConfig()) * 64
    assert tp2 > 3 * tokens


def test_rejects_non_power_of_two_tp():
    with pytest.raises(ModelDoesNotFitError, match="power of two"):
        kv_cache_blocks(GPUS["a100-sxm4-80gb"], MODELS["llama3-8b"], 3, EngineConfig())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownSpecError, match="a100-sxm4-80gb"):
        gpu_spec("v100")
    with pytest.raises(UnknownSpecError, match="llama3-8b"):
        model_spec("gpt2")
