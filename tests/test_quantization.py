"""Mixed precision: the quantizer, its costs, quantization-aware fine-tune, activation bits,
packed export, the int8 network, and bit-width search (RL modes, Optuna, uniform bits)."""

import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from optuna.distributions import CategoricalDistribution, IntDistribution

from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.evaluator import Evaluator
from automlprune.export import load_packed, save_packed
from automlprune.materialize import materialize
from automlprune.quantization import RECORD_ATTRIBUTE, SCHEMES, pack_codes, quantize, unpack_codes
from automlprune.rl.env import LayerWidthEnv
from automlprune.search.budget import parse_budget
from automlprune.search.store import distributions, from_params, to_params
from automlprune.space import Candidate, SearchSpace
from automlprune.space.config import SpaceConfig
from automlprune.tasks import EvalSettings, FinetuneSettings

SETTINGS = EvalSettings(bn_batches=2, bn_batch_size=64)


def _space(model, data, **kwargs):
    config = SpaceConfig(**{"bit_choices": (2, 3, 4, 8, 32), **kwargs})
    return SearchSpace(model, data.example_input(), config)


@pytest.fixture(scope="module")
def bits_space(trained_digits_model, digits):
    return _space(trained_digits_model, digits, pin_first_last_bits=8)


@pytest.fixture(scope="module")
def bits_evaluator(trained_digits_model, bits_space, digits):
    return Evaluator(trained_digits_model, bits_space, digits, SETTINGS)


# ---- the quantizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_fit_the_bits_and_dequantize_within_half_a_step(scheme, bits):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    q = quantize(w, bits, scheme)
    unsigned = q.codes + q.offset
    assert unsigned.min() >= 0 and unsigned.max() < 2 ** bits
    assert q.scale.shape == ((6,) if scheme.startswith("per_channel") else (1,))
    step = q.scale.view(-1, 1, 1, 1) if scheme.startswith("per_channel") else q.scale
    assert torch.all((q.dequantize() - w).abs() <= step / 2 + 1e-6)
    levels = [torch.unique(row).numel() for row in q.dequantize().flatten(1)] if scheme.startswith("per_channel") else [torch.unique(q.dequantize()).numel()]
    assert max(levels) <= 2 ** bits  # at most 2^bits distinct values per scale
    again = quantize(q.dequantize(), bits, scheme)
    if scheme.endswith("_symmetric"):  # symmetric grids are fixed points of the quantizer
        assert torch.equal(again.dequantize(), q.dequantize())
    else:  # asymmetric ranges move by less than a step: values on the grid stay within half a new step
        new_step = again.scale.view(-1, 1, 1, 1) if scheme.startswith("per_channel") else again.scale
        assert torch.all((again.dequantize() - q.dequantize()).abs() <= new_step / 2 + 1e-6)


def test_bits_outside_2_to_31_are_refused():
    with pytest.raises(ConfigError, match="use 2 to 31 bits"):
        quantize(torch.randn(2, 2), 1)
    with pytest.raises(ConfigError, match="bit choices must be whole numbers from 2 to 32"):
        SpaceConfig(bit_choices=(1, 32))
    with pytest.raises(ConfigError, match="bits.scheme 'log2' is unknown"):
        SpaceConfig.from_dict({"bits": {"choices": [4, 32], "scheme": "log2"}})


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_pack_and_unpack_are_inverse_and_take_n_bits_each(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=1001)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and len(packed) == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack_codes(packed, bits, 1001), codes)


# ---- costs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bytes_count_bits_and_scales_of_the_scheme(trained_digits_model, digits, scheme):
    space = _space(trained_digits_model, digits, bit_scheme=scheme, activation_bits=8)
    cost = CostModel(space, trained_digits_model)
    candidate = space.uniform(1.0, 4)
    expected, bitops = 0.0, 0.0
    per_layer = cost.per_layer(space.full())
    for name, module in trained_digits_model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            entries = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
            entries = entries if scheme.startswith("per_channel") else 1
            expected += module.weight.numel() * 4 / 8 + entries * (4 if scheme.endswith("_symmetric") else 8)
            expected += 4 * (module.bias.numel() if module.bias is not None else 0)
            bitops += per_layer[name]["macs"] * 4 * 8
        elif isinstance(module, torch.nn.BatchNorm2d):
            expected += 4 * 2 * module.num_features
    costs = cost(candidate)
    assert costs.bytes == pytest.approx(expected)
    assert costs.bitops == pytest.approx(bitops)
    assert cost.base.bitops == pytest.approx(cost.base.macs * 32 * 8)


# ---- accuracy -----------------------------------------------------------------------------------
def test_accuracy_drops_on_average_as_bits_drop(trained_digits_model, digits):
    mean = {}
    for bits in (8, 4, 2):
        accs = []
        for scheme in SCHEMES:
            space = _space(trained_digits_model, digits, bit_scheme=scheme)
            evaluator = Evaluator(trained_digits_model, space, digits, SETTINGS)
            accs.append(evaluator.evaluate(space.uniform(1.0, bits)).accuracy)
        mean[bits] = np.mean(accs)
    full = Evaluator(trained_digits_model, _space(trained_digits_model, digits), digits, SETTINGS).evaluate(Candidate()).accuracy
    assert full - 0.01 <= mean[8] and mean[8] >= mean[4] >= mean[2] and mean[2] < mean[8] - 0.02


def test_masked_and_materialized_quantized_networks_agree_and_record_their_bits(trained_digits_model, bits_space, digits):
    from automlprune.materialize import mask

    candidate = Candidate.make({"features.0": 0.5}, {"features.3": 3, "classifier.1": 2})
    x = digits.example_input().repeat(4, 1, 1, 1) + torch.randn(4, 1, 8, 8)
    net, masked = materialize(trained_digits_model, candidate, bits_space), mask(trained_digits_model, candidate, bits_space)
    assert torch.allclose(net(x), masked(x), atol=1e-5)
    record = getattr(net, RECORD_ATTRIBUTE)
    assert {n: v["bits"] for n, v in record["layers"].items()} == {"features.0": 8, "features.3": 3, "classifier.1": 2, "classifier.3": 8}
    assert record["layers"]["features.3"]["scale"].shape == (net.features[3].out_channels,)


def test_quantization_aware_finetune_keeps_weights_on_their_grid_and_recovers_accuracy(bits_evaluator, bits_space):
    candidate = bits_space.uniform(1.0, 2)
    before = bits_evaluator.evaluate(candidate).accuracy
    tuned = bits_evaluator.finetune(candidate, FinetuneSettings(epochs=2, batch_size=64, lr=0.01), progress=False)
    w = tuned.model.features[3].weight
    for channel in w:
        assert len(torch.unique(channel)) <= 3  # 2 bits, symmetric: {-s, 0, s}
    assert not hasattr(tuned.model.features[3], "parametrizations")
    assert tuned.val_accuracy > before


def test_activation_bits_quantize_layer_inputs(trained_digits_model, digits):
    float_space = _space(trained_digits_model, digits)
    space = _space(trained_digits_model, digits, activation_bits=2)
    candidate = Candidate()
    plain = Evaluator(trained_digits_model, float_space, digits, SETTINGS)
    quant = Evaluator(trained_digits_model, space, digits, SETTINGS)
    net = quant.network(candidate)
    seen = []
    net.features[3].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net(digits.example_input())
    assert len(torch.unique(seen[0])) <= 4
    assert quant.evaluate(candidate).accuracy < plain.evaluate(candidate).accuracy
    eight = Evaluator(trained_digits_model, _space(trained_digits_model, digits, activation_bits=8), digits, SETTINGS)
    assert eight.evaluate(candidate).accuracy >= plain.evaluate(candidate).accuracy - 0.02


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["per_channel_symmetric", "per_tensor_asymmetric"])
def test_packed_file_is_the_reported_bytes_plus_metadata(tmp_path, trained_digits_model, digits, scheme):
    space = _space(trained_digits_model, digits, bit_scheme=scheme)
    evaluator = Evaluator(trained_digits_model, space, digits, SETTINGS)
    candidate = Candidate.make({"features.0": 0.5}, {name: 3 for name in space.quantizable})
    net = evaluator.network(candidate)
    path = save_packed(net, tmp_path / "net.qpt")
    restored = load_packed(path, trained_digits_model)  # rebuilt from the original architecture, nothing unpickled
    x = digits.example_input().repeat(3, 1, 1, 1)
    assert torch.allclose(restored(x), net(x), atol=1e-6)
    assert trained_digits_model.features[0].out_channels == 16  # the original is not changed
    with pytest.raises(ConfigError, match="does not name its architecture"):
        load_packed(path)
    reported = evaluator.cost_model(candidate).bytes
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    overhead = path.stat().st_size - reported - buffers
    assert 0 < overhead < 4_000  # the compressed structure; the payload is the reported bytes plus BN statistics
    torch.save(net, tmp_path / "float.pt")
    assert path.stat().st_size < (tmp_path / "float.pt").stat().st_size / 2


def test_packing_a_float_network_stores_it_raw(tmp_path, trained_digits_model, digits_space):
    from automlprune.export import load_packed

    net = materialize(trained_digits_model, digits_space.uniform(0.5), digits_space)
    path = save_packed(net, tmp_path / "x.qpt")
    tensors = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert tensors <= path.stat().st_size <= tensors + 4096
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(load_packed(path, trained_digits_model)(x), net.eval()(x))


def test_int8_network_matches_float_accuracy(trained_digits_model, digits):
    space = _space(trained_digits_model, digits, bit_choices=(8, 32))
    evaluator = Evaluator(trained_digits_model, space, digits, SETTINGS)
    out = evaluator.int8(space.uniform(0.75, 8))
    assert abs(out["int8"]["accuracy"] - out["float32"]["accuracy"]) <= 0.03
    assert set(out["int8"]["latency_ms"]) == set(SETTINGS.latency_batch_sizes)
    assert any("quantized" in type(m).__module__ for m in out["model"].modules())
    with pytest.raises(ConfigError, match="every Conv2d/Linear layer at 8 bits"):
        evaluator.int8(space.uniform(1.0, 32))


# ---- search -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*render modes")
@pytest.mark.parametrize("mode", ["bits", "joint"])
@pytest.mark.parametrize("action_type", ["continuous", "discrete"])
def test_bit_modes_pass_the_checker_and_every_episode_meets_the_budget(bits_evaluator, bits_space, mode, action_type):
    env = LayerWidthEnv(bits_evaluator, "bytes=0.15", mode=mode, action_type=action_type)
    check_env(env)
    budget = parse_budget("bytes=0.15")
    env.action_space.seed(0)
    expected = len(bits_space.bit_searchable) + (len(bits_space.prunable) if mode == "joint" else 0)
    assert len(env.decisions) == expected
    for i in range(12):
        env.reset(seed=i)
        done, steps = False, 0
        while not done:
            _, _, done, _, info = env.step(env.action_space.sample() if i < 10 else
                                           (env.action_space.n - 1 if action_type == "discrete" else np.array([1.0], np.float32)))
            steps += 1
        assert steps == expected and info["feasible"]
        candidate = Candidate.from_dict(info["candidate"])
        assert budget.bind(bits_evaluator.cost_model.base).met_by(bits_evaluator.cost_model(candidate))
        if mode == "bits":
            assert not candidate.ratios


def test_haq_lowers_bits_from_the_last_layer_backward(bits_evaluator, bits_space):
    env = LayerWidthEnv(bits_evaluator, "bytes=0.12", mode="bits", action_type="discrete")
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(env.action_space.n - 1)  # 32 bits everywhere: over budget
    bits = [bits_space.weight_bits(Candidate.from_dict(info["candidate"]))[l] for l in env.bit_layers]
    assert info["bits_lowered"] > 0 and bits == sorted(bits, reverse=True) and bits[0] > bits[-1]


def test_bits_mode_refuses_a_budget_only_pruning_can_meet(bits_evaluator):
    with pytest.raises(ConfigError, match="out of reach in mode bits"):
        LayerWidthEnv(bits_evaluator, "macs=0.5", mode="bits")


def test_optuna_searches_bits_as_categorical_and_round_trips(bits_space):
    dists = distributions(bits_space)
    assert all(isinstance(d, CategoricalDistribution) for k, d in dists.items() if k.startswith("bits:"))
    assert all(isinstance(d, IntDistribution) for k, d in dists.items() if k.startswith("ratio:"))
    candidate = Candidate.make({"features.0": 0.5}, {"features.3": 3})
    assert from_params(bits_space, to_params(bits_space, candidate)).bit_map == {"features.3": 3}


@pytest.mark.parametrize("strategy,options", [("optuna-tpe", {}), ("haq", {}), ("ddpg", {"mode": "joint"}), ("uniform", {"bits": 4})])
def test_bit_searching_strategies_meet_a_bytes_budget(tmp_path, trained_digits_model, bits_space, digits, strategy, options):
    from automlprune.search import STRATEGIES
    from automlprune.search.base import SearchContext, run_strategy
    from automlprune.search.store import RunStore

    evaluator = Evaluator(trained_digits_model, bits_space, digits, SETTINGS)
    budget = parse_budget("bytes=0.15")
    store = RunStore(tmp_path / "run")
    study = store.study(RunStore.study_name(strategy, budget.label, 0), {"strategy": strategy, "budget": budget.label, "seed": 0})
    context = SearchContext(bits_space, evaluator.cost_model, study, evaluator.scores, trained_digits_model, data=digits)
    instance = STRATEGIES.get(strategy)(context, budget, seed=0, max_evals=6, **options)
    outcome = run_strategy(instance, evaluator, store, study, max_evals=6)
    assert outcome.answer is not None and budget.bind(evaluator.cost_model.base).met_by(outcome.answer.costs)
    assert outcome.answer.candidate.bits  # the answer is quantized
    if strategy == "uniform":
        assert set(bits_space.weight_bits(outcome.answer.candidate)[l] for l in bits_space.bit_searchable) == {4}


def test_uniform_bits_must_be_a_choice(tmp_path, trained_digits_model, digits_space, digits):
    with pytest.raises(ConfigError, match="not among the space's bit choices"):
        from automlprune.search import STRATEGIES
        from automlprune.search.base import SearchContext

        evaluator = Evaluator(trained_digits_model, digits_space, digits, SETTINGS)
        context = SearchContext(digits_space, evaluator.cost_model, None, evaluator.scores, trained_digits_model, data=digits)
        STRATEGIES.get("uniform")(context, parse_budget("macs=0.5"), bits=4).ask()


def test_loading_a_file_that_is_not_packed_is_one_sentence(tmp_path):
    path = tmp_path / "x.qpt"
    path.write_bytes(b"not a network")
    with pytest.raises(ConfigError, match="is not a packed automlprune network"):
        load_packed(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_packed(tmp_path / "missing.qpt")


def test_a_packed_file_of_the_old_pickled_format_is_never_unpickled(tmp_path):
    """A crafted file in the old layout (pickled metadata) would create a marker file if unpickled."""
    import pickle
    import struct
    import zlib

    from automlprune.export import OLD_MAGIC

    marker = tmp_path / "code-ran"

    class WritesAMarker:
        def __reduce__(self):
            return open, (str(marker), "w")

    meta = zlib.compress(pickle.dumps({"module": WritesAMarker(), "entries": []}))
    path = tmp_path / "crafted.qpt"
    path.write_bytes(OLD_MAGIC + struct.pack("<Q", len(meta)) + meta)
    with pytest.raises(ConfigError, match="no longer read"):
        load_packed(path)
    assert not marker.exists()


def test_a_packed_file_refuses_another_architecture(tmp_path, trained_digits_model, digits):
    from automlprune.models import build_model

    space = _space(trained_digits_model, digits)
    net = Evaluator(trained_digits_model, space, digits, SETTINGS).network(Candidate.make({}, {n: 4 for n in space.quantizable}))
    path = save_packed(net, tmp_path / "net.qpt", {"model": "digits_cnn", "num_classes": 10, "in_channels": 1, "kwargs": {}})
    assert torch.allclose(load_packed(path)(digits.example_input()), net(digits.example_input()), atol=1e-6)
    with pytest.raises(ConfigError, match="load it with the model it was exported from"):
        load_packed(path, build_model("resnet20", 10, 1))
