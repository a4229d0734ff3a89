"""Training: determinism, metrics against an independent evaluation, save-every series."""

from __future__ import annotations

import torch

from kfacbound.checkpoint import load_checkpoint
from kfacbound.data import load_dataset
from kfacbound.train import TrainConfig, train_model


def test_training_is_bitwise_deterministic(tiny_binary):
    cfg = TrainConfig(epochs=2, seed=3, batch_size=50)
    a, _, _ = train_model("fc", tiny_binary, config=cfg, progress=False, widths=[16])
    b, _, _ = train_model("fc", tiny_binary, config=cfg, progress=False, widths=[16])
    c, _, _ = train_model("fc", tiny_binary, config=TrainConfig(epochs=2, seed=4, batch_size=50),
                          progress=False, widths=[16])
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_training_learns_and_metrics_are_right(tmp_path):
    train = load_dataset("digits", "train", binary=True)
    test = load_dataset("digits", "test", binary=True)
    cfg = TrainConfig(epochs=8, lr=0.05, seed=0)
    model, init, metrics = train_model("fc", train, test, cfg, out=tmp_path / "m.kfb",
                                       save_every=4, progress=False, widths=[32], bn=True)
    with torch.no_grad():
        pred = (model(test.X)[:, 0] > 0).long()
    assert abs(metrics["test_error"] - float((pred != test.y).float().mean())) < 1e-9
    assert metrics["train_error"] < 0.15
    assert not torch.equal(model.fc1.weight, init.fc1.weight)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m-epoch004.kfb", "m-epoch008.kfb", "m.kfb"]
    ckpt = load_checkpoint(tmp_path / "m.kfb")
    assert ckpt.meta["training"]["epochs"] == 8 and ckpt.loss == "bce"
    torch.testing.assert_close(ckpt.init_model.fc1.weight, init.fc1.weight)


def test_cosine_schedule_matches_a_hand_written_loop(tiny_binary):
    """schedule='cosine' against SGD written out here with lr_t = lr·½(1 + cos(π t/T))."""
    import copy
    import math

    from torch.utils.data import DataLoader

    cfg = TrainConfig(epochs=2, seed=5, batch_size=50, lr=0.05, schedule="cosine")
    model, init, _ = train_model("fc", tiny_binary, config=cfg, progress=False, widths=[8])
    ref = copy.deepcopy(init).train()
    loader = DataLoader(tiny_binary, batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    T = 2 * len(loader)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    t = 0
    for _ in range(2):
        for X, y in loader:
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * t / T))
            opt.zero_grad()
            out = ref(X)
            torch.nn.functional.binary_cross_entropy_with_logits(
                out[:, 0], y.to(out.dtype)).backward()
            opt.step()
            t += 1
    for (_, pa), (_, pb) in zip(model.state_dict().items(), ref.state_dict().items(),
                                strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    const, _, _ = train_model("fc", tiny_binary, config=TrainConfig(
        epochs=2, seed=5, batch_size=50, lr=0.05), progress=False, widths=[8])
    assert not torch.allclose(const.fc1.weight, model.fc1.weight)
