"""Model zoo specs, BatchNorm folding and safe checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from kfacbound.checkpoint import import_state_dict, load_checkpoint, save_checkpoint
from kfacbound.errors import KfacboundError
from kfacbound.models import (
    ALIASES,
    build_model,
    count_parameters,
    fold_batchnorm,
    resolve_spec,
    spec_from_json,
    spec_to_json,
)

DR_PARAMS = {"T-600": 471_601, "T-1200": 943_201, "T-300-300": 326_101, "T-600-600": 832_201}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_dziugaite_roy_parameter_counts(alias):
    # the parameter counts of Dziugaite & Roy's table (SCIENCE.md §5)
    model = build_model(resolve_spec(alias, [1, 28, 28], 1), seed=0)
    assert count_parameters(model) == DR_PARAMS[alias]


@pytest.mark.parametrize("arch,opts", [("fc", {"widths": [7, 5], "bn": True}),
                                       ("lenet5", {"bn": True}),
                                       ("cnn", {"channels": [4], "widths": [8], "pool": "avg"}),
                                       ("T-600", {})])
def test_spec_json_roundtrip(arch, opts):
    spec = resolve_spec(arch, [1, 28, 28], 10, **opts)
    again = spec_from_json(json.dumps(json.loads(spec_to_json(spec))))
    assert again == spec
    a, b = build_model(spec, seed=5), build_model(again, seed=5)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(a(x), b(x))


def test_dr_init_statistics():
    model = build_model(resolve_spec("T-600", [784], 1), seed=0)
    w = model.fc1.weight
    w = w.detach()
    assert float(w.abs().max()) <= 0.08 + 1e-7  # truncated at two standard deviations
    # std of N(0, 0.04²) truncated at ±2σ is 0.04·0.8796
    assert abs(float(w.std()) - 0.04 * 0.8796) < 5e-4
    assert torch.all(model.fc1.bias == 0.1) and torch.all(model.out.bias == 0)


def test_glorot_init_std():
    model = build_model(resolve_spec("fc", [100], 50, widths=[200], init="glorot"), seed=0)
    assert abs(float(model.fc1.weight.std()) - (2 / 300) ** 0.5) < 3e-3
    assert torch.all(model.fc1.bias == 0)


def test_unknown_arch_and_bad_options():
    with pytest.raises(KfacboundError, match="unknown architecture"):
        resolve_spec("vgg", [784], 10)
    with pytest.raises(KfacboundError, match="activation"):
        resolve_spec("fc", [784], 10, activation="gelu")
    with pytest.raises(KfacboundError, match="image"):
        resolve_spec("lenet5", [784], 10)


@pytest.mark.parametrize("arch,shape", [("fc", [1, 8, 8]), ("cnn", [1, 8, 8]),
                                        ("lenet5", [1, 28, 28])])
def test_fold_batchnorm_same_function(arch, shape):
    model = build_model(resolve_spec(arch, shape, 3, bn=True, channels=[3], widths=[6]), seed=0)
    model.train()
    model(torch.randn(64, *shape) * 2 + 1)  # move the running statistics
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.normal_()
    model.eval()
    folded = fold_batchnorm(model).double()
    x = torch.randn(5, *shape)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x.double()), model.double()(x.double()))


def _tiny_model():
    spec = resolve_spec("fc", [1, 8, 8], 3, widths=[6], bn=True)
    return spec, build_model(spec, seed=1), build_model(spec, seed=2)


def test_checkpoint_roundtrip_exact(tmp_path):
    spec, model, init = _tiny_model()
    model.train()
    model(torch.randn(10, 1, 8, 8))
    model.eval()
    path = save_checkpoint(tmp_path / "m.kfb", model, spec, init_model=init,
                           dataset={"name": "digits"}, loss="ce", metrics={"train_error": 0.1})
    ckpt = load_checkpoint(path)
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(ckpt.model(x), model(x))
    assert torch.equal(ckpt.init_model(x), init.eval()(x))
    assert not ckpt.model.training and ckpt.spec == spec and ckpt.loss == "ce"
    assert ckpt.metrics["train_error"] == 0.1 and ckpt.dataset == {"name": "digits"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_truncated_and_foreign_files(tmp_path):
    spec, model, _ = _tiny_model()
    path = save_checkpoint(tmp_path / "m.kfb", model, spec)
    data = path.read_bytes()
    (tmp_path / "t.kfb").write_bytes(data[: len(data) // 2])
    with pytest.raises(KfacboundError, match="truncated"):
        load_checkpoint(tmp_path / "t.kfb")
    (tmp_path / "g.kfb").write_bytes(b"garbage" * 10)
    with pytest.raises(KfacboundError):
        load_checkpoint(tmp_path / "g.kfb")
    with pytest.raises(KfacboundError, match="not found"):
        load_checkpoint(tmp_path / "nope.kfb")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(KfacboundError, match="kfacbound import"):
        load_checkpoint(tmp_path / "sd.pt")


def test_nan_weights_rejected(tmp_path):
    spec, model, _ = _tiny_model()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(KfacboundError, match="non-finite"):
        save_checkpoint(tmp_path / "m.kfb", model, spec)
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    with pytest.raises(KfacboundError, match="non-finite"):
        import_state_dict(tmp_path / "nan.pt", spec, tmp_path / "o.kfb")
    assert not (tmp_path / "o.kfb").exists()


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_refused_without_running(tmp_path, monkeypatch, zip_format):
    monkeypatch.chdir(tmp_path)
    spec, model, _ = _tiny_model()
    state = dict(model.state_dict())
    state["evil"] = _Payload()
    path = tmp_path / "evil.pt"
    if zip_format:
        torch.save(state, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(state, fh, protocol=2)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(KfacboundError, match="refusing"):
        import_state_dict(path, spec, tmp_path / "o.kfb")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "o.kfb").exists()


def test_import_state_dict_mismatch_and_success(tmp_path):
    spec, model, init = _tiny_model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(init.state_dict(), tmp_path / "init.pt")
    ckpt = import_state_dict(tmp_path / "sd.pt", spec, tmp_path / "o.kfb",
                             init_path=tmp_path / "init.pt")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(ckpt.model(x), model.eval()(x)) and ckpt.init_model is not None
    wrong = resolve_spec("fc", [1, 8, 8], 3, widths=[7], bn=True)
    with pytest.raises(KfacboundError, match="shape"):
        import_state_dict(tmp_path / "sd.pt", wrong, tmp_path / "w.kfb")
    other = resolve_spec("fc", [1, 8, 8], 3, widths=[6], bn=False)
    with pytest.raises(KfacboundError, match="unexpected"):
        import_state_dict(tmp_path / "sd.pt", other, tmp_path / "w.kfb")


def test_header_length_128_is_not_mistaken_for_a_pickle(tmp_path):
    # a safetensors file starts with its header length (little-endian u64); 128 mod 256 puts 0x80
    # in the first byte, which a naive "pickle magic" check would refuse
    spec, model, _ = _tiny_model()
    for pad in range(0, 300):
        path = save_checkpoint(tmp_path / "m.kfb", model, spec, note="x" * pad)
        if path.read_bytes()[0] == 0x80:
            break
    else:  # pragma: no cover - the loop always finds one within 256 paddings
        pytest.fail("no padding produced a header length of 128 mod 256")
    assert torch.equal(load_checkpoint(path).model.fc1.weight, model.fc1.weight)
