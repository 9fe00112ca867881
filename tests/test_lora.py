"""LoRA on timm backbones: what is trainable, what stays frozen, and the state federation exchanges."""
import pytest
import torch
from torch import nn

from hashing.backbones import create_backbone
from hashing.errors import ConfigError, WeightsError
from hashing.lora import is_lora_wrapped, lora_targets, set_lora_train, wrap_lora
from hashing.state import load_state as load_trainable_state
from hashing.state import state_nbytes, trainable_state

X = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(seed=0, **lora_kwargs):
    """The real tf_efficientnet_lite0 backbone, LoRA-wrapped, with a small hash head on top."""
    backbone, dim = create_backbone()
    torch.manual_seed(seed)
    wrap_lora(backbone, **lora_kwargs)
    head = nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64))
    return nn.Sequential(backbone, head).eval()


def frozen_snapshot(model):
    """Every base weight and buffer (everything that is not a LoRA tensor), cloned."""
    return {k: v.clone() for k, v in model[0].state_dict().items() if "lora_" not in k}


def test_efficientnet_targets_are_1x1_convs_of_last_blocks():
    backbone, _ = create_backbone()
    targets = lora_targets(backbone)  # default: the last two stages (4 blocks + 1 in Lite0) and conv_head
    assert targets[:2] == ["blocks.5.0.conv_pw", "blocks.5.0.conv_pwl"] and targets[-3:] == [
        "blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head"]
    assert len(targets) == 2 * (4 + 1) + 1 and all(backbone.get_submodule(t).kernel_size == (1, 1) for t in targets)
    assert lora_targets(backbone, stages=1) == ["blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head"]
    assert "conv_head" not in lora_targets(backbone, include_head=False)


def test_only_lora_params_trainable_and_output_unchanged():
    backbone, _ = create_backbone()
    with torch.no_grad():
        before = backbone(X)
    wrap_lora(backbone)
    assert is_lora_wrapped(backbone) and not backbone.training
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 11  # A and B for each of the 11 targets
    with torch.no_grad():
        after = backbone(X)
    assert torch.equal(before, after)  # lora_B starts at zero
    with pytest.raises(ConfigError, match="already"):
        wrap_lora(backbone)


def test_training_steps_change_lora_and_head_only():
    model = build()
    base = frozen_snapshot(model)
    lora0 = {n: p.detach().clone() for n, p in model[0].named_parameters() if p.requires_grad}
    head0 = {k: v.clone() for k, v in model[1].state_dict().items()}
    set_lora_train(model)
    assert model[1].training and not model[0].bn1.training and not model[0].blocks[6][0].bn1.training
    assert model[0].blocks[6][0].conv_pw.lora_dropout["default"].training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # lora_A gets no gradient while lora_B is zero: two steps move both
        opt.zero_grad()
        loss = ((model(X) - target) ** 2).mean()
        loss.backward()
        opt.step()
    for k, v in frozen_snapshot(model).items():
        assert torch.equal(v, base[k]), f"frozen tensor {k} changed"
    for n, p in model[0].named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, lora0[n]), f"LoRA parameter {n} did not move"
    for k, v in model[1].state_dict().items():
        assert not torch.equal(v, head0[k]), f"head tensor {k} did not change"


def test_state_holds_only_lora_and_head_and_is_small():
    model = build()
    state = trainable_state(model)
    names = list(state)
    assert all(("lora_A" in k or "lora_B" in k) if k.startswith("0.") else k.startswith("1.") for k in names)
    assert {"1.1.running_mean", "1.1.running_var", "1.1.num_batches_tracked", "1.0.weight"} <= set(names)
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    assert names == list(trainable_state(model))  # deterministic order
    backbone_bytes = sum(p.numel() * p.element_size() for n, p in model[0].named_parameters() if "lora_" not in n)
    # r=16 on the last two stages: 226,048 LoRA numbers (6.7% of the backbone) plus the head
    assert state_nbytes(state) < 0.10 * backbone_bytes
    # the state is a copy: changing it leaves the model alone
    state["1.0.weight"].add_(1.0)
    assert not torch.equal(state["1.0.weight"], model[1][0].weight)


def test_state_round_trip_into_fresh_model():
    a = build(seed=0)
    set_lora_train(a)
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        a(X).pow(2).mean().backward()
        opt.step()
    a.eval()
    state = trainable_state(a)
    b = build(seed=1)
    with torch.no_grad():
        assert not torch.equal(a(X), b(X))
    load_trainable_state(b, state)
    with torch.no_grad():
        assert torch.equal(a(X), b(X))
    got = trainable_state(b)
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
    # numpy arrays (as a Flower ArrayRecord gives them back) load too
    c = build(seed=2)
    load_trainable_state(c, {k: v.numpy() for k, v in state.items()})
    with torch.no_grad():
        assert torch.equal(a(X), c(X))


def test_load_is_strict_and_atomic():
    model = build(seed=0)
    state = trainable_state(build(seed=3))
    before = trainable_state(model)

    def unchanged():
        now = trainable_state(model)
        return all(torch.equal(now[k], before[k]) for k in before)

    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(WeightsError, match="missing"):
        load_trainable_state(model, missing)
    extra = dict(state, **{"0.blocks.0.0.conv_dw.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unexpected.*blocks.0.0.conv_dw"):
        load_trainable_state(model, extra)
    wrong = dict(state)
    wrong["1.0.weight"] = torch.zeros(32, 1280)
    with pytest.raises(WeightsError, match=r"wrong shape.*1\.0\.weight"):
        load_trainable_state(model, wrong)
    other_rank = trainable_state(build(seed=0, r=8))
    with pytest.raises(WeightsError):
        load_trainable_state(model, other_rank)
    assert unchanged()


def test_vit_targets_qkv():
    vit, dim = create_backbone("vit_tiny_patch16_224", weights="random", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    targets = lora_targets(vit)
    assert len(targets) == len(vit.blocks) and all(t.endswith("attn.qkv") for t in targets)
    with torch.no_grad():
        before = vit(x)
    wrap_lora(vit, r=4)
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(vit.blocks)
    assert all(".attn.qkv.lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(before, vit(x))
    state = trainable_state(vit)
    assert list(state) == trainable


def test_unknown_architecture_needs_explicit_targets():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with pytest.raises(ConfigError, match="targets="):
        lora_targets(model)
    with pytest.raises(ConfigError, match="targets="):
        wrap_lora(model)
    with pytest.raises(ConfigError, match="names no module"):
        wrap_lora(model, targets=["nope"])
    wrap_lora(model, r=2, targets=["0", "3"])
    assert sorted(trainable_state(model)) == sorted(
        ["0.lora_A.default.weight", "0.lora_B.default.weight", "3.lora_A.default.weight", "3.lora_B.default.weight"])
