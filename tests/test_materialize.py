import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from automlprune.export import export_model
from automlprune.importance import CRITERIA, channel_order
from automlprune.materialize import mask, materialize
from automlprune.quantization import quantize_weights_
from automlprune.models import build_model
from automlprune.space import Candidate, SearchSpace, SpaceConfig

from conftest import ZOO_CASES, ZOO_IDS, randomize_batchnorm


@pytest.mark.parametrize("name,size,kwargs", ZOO_CASES, ids=ZOO_IDS)
def test_materialized_net_computes_what_the_masked_net_does(name, size, kwargs):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, 10, 3, **kwargs))
    x = torch.randn(4, 3, size, size)
    space = SearchSpace(model, x[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    for _ in range(2):
        cand = Candidate.make({g: float(rng.choice(space.config.ratios)) for g in space.prunable})
        pruned, masked = materialize(model, cand, space).eval(), mask(model, cand, space).eval()
        with torch.no_grad():
            assert torch.allclose(pruned(x), masked(x), atol=1e-4, rtol=0)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input model is untouched


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale"])
def test_criteria_decide_which_channels_survive(criterion, trained_digits_model, digits_space):
    order = channel_order(trained_digits_model, digits_space, criterion)
    for group in digits_space.groups:
        assert sorted(order[group.name].tolist()) == list(range(group.channels))
    cand = Candidate.make({"features.3": 0.5})
    net = materialize(trained_digits_model, cand, digits_space, criterion)
    kept = order["features.3"][:16].sort().values
    original = trained_digits_model.features[3].weight
    assert torch.equal(net.features[3].weight, original[kept][:, order["features.0"].sort().values])


def test_l1_keeps_the_largest_filters():
    model = build_model("vgg11_bn", 10, 3).eval()
    space = SearchSpace(model, torch.zeros(1, 3, 32, 32))
    with torch.no_grad():  # filter c has every weight equal to c + 1: L1 order is the channel order
        w = model.features[0].weight
        w.copy_(torch.arange(1, 65, dtype=w.dtype).view(-1, 1, 1, 1).expand_as(w))
    net = materialize(model, Candidate.make({"features.0": 0.25}), space, "l1")
    assert net.features[0].out_channels == 16
    assert net.features[0].weight[:, 0, 0, 0].tolist() == list(range(49, 65))


def test_criteria_registry_lists_core_criteria():
    assert {"l1", "l2", "bn_scale"} <= set(CRITERIA.names())


def test_quantized_weights_take_at_most_2_to_the_bits_levels():
    model = build_model("digits_cnn", 10, 1)
    quantize_weights_(model, {"features.3": 3})
    w = model.features[3].weight
    for channel in w:
        assert len(torch.unique(channel)) <= 2 ** 3 - 1


def test_bits_in_candidate_quantize_the_materialized_net(trained_digits_model, digits):
    space = SearchSpace(trained_digits_model, digits.example_input(), SpaceConfig(bit_choices=(2, 8, 32)))
    net = materialize(trained_digits_model, Candidate.make(bits={"features.3": 2}), space)
    assert len(torch.unique(net.features[3].weight[0])) <= 3
    assert torch.equal(net.features[0].weight, trained_digits_model.features[0].weight)


def test_exported_program_runs_without_automlprune_at_any_batch_size(tmp_path, trained_digits_model, digits_space, digits):
    net = materialize(trained_digits_model, digits_space.uniform(0.5), digits_space)
    xs = [torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(b)) for b in (1, 7)]
    with torch.no_grad():
        expected = [net(x) for x in xs]
    export_model(net, digits.example_input(), tmp_path / "net.pt2")
    export_model(net, digits.example_input(), tmp_path / "net.ts")
    torch.save(xs, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["automlprune"] = None  # importing automlprune now fails
        import torch
        xs, ys = torch.load("{tmp_path}/x.pt"), torch.load("{tmp_path}/y.pt")
        prog = torch.export.load("{tmp_path}/net.pt2").module()
        ts = torch.jit.load("{tmp_path}/net.ts")
        for x, y in zip(xs, ys):
            assert torch.allclose(prog(x), y, atol=1e-4) and torch.allclose(ts(x), y, atol=1e-4)
        bns = [n for n in prog.graph.nodes if "batch_norm" in str(n.target)]
        assert not bns, bns  # folded into the convolutions
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_onnx_export_is_valid(tmp_path, trained_digits_model, digits_space, digits):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    net = materialize(trained_digits_model, digits_space.uniform(0.5), digits_space)
    path = export_model(net, digits.example_input(), tmp_path / "net.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # a dynamic batch dimension: deployable at any batch size
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = net(x).numpy()
        (got,) = session.run(["logits"], {"input": x.numpy()})
        assert got.shape == expected.shape and abs(got - expected).max() < 1e-4
