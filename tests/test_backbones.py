"""Backbones: the bundled EfficientNet-Lite0 weights against the reference implementation, local files, errors."""
import time

import pytest
import torch
import torch.nn.functional as F

from hashing.backbones import (DEFAULT_BACKBONE, bundled_weights_path, create_backbone, create_classifier,
                               data_config, feature_dim, weights_fingerprint)
from hashing.errors import WeightsError


@pytest.fixture(scope="module")
def chelsea():
    """scikit-image's cat photo, resized to 224 and normalised with mean 0.5 / std 0.5."""
    from skimage import data

    img = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (img - 0.5) / 0.5


@pytest.fixture(scope="module")
def backbone():
    return create_backbone()


def test_bundled_weights_file_is_found():
    path = bundled_weights_path()
    assert path is not None and path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert sum(not k.endswith("num_batches_tracked") for k in sd) == 247


def test_logits_equal_reference_implementation(chelsea):
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    ref = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(bundled_weights_path(), map_location="cpu", weights_only=True), strict=True)
    ref.eval()
    ours = create_classifier()
    assert not ours.training
    with torch.inference_mode():
        a = ours(chelsea)
        b = ref(chelsea)
    assert a.shape == b.shape == (1, 1000)
    assert (a - b).abs().max().item() <= 1e-5
    assert int(a.argmax()) == int(b.argmax()) == 285  # Egyptian cat


def test_features_and_config(backbone):
    model, dim = backbone
    assert dim == 1280 == feature_dim(model)
    assert not model.training
    with torch.inference_mode():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 1280)
    cfg = data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)


def test_features_match_classifier_trunk(backbone, chelsea):
    model, _ = backbone
    clf = create_classifier()
    with torch.inference_mode():
        feats = model(chelsea)
        logits = clf(chelsea)
        # pooled features through the 1000-class head give the classifier's logits
        torch.testing.assert_close(clf.classifier(feats), logits, rtol=0, atol=1e-5)


def test_fingerprint_is_deterministic_and_sensitive(backbone):
    model, _ = backbone
    fp = weights_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert weights_fingerprint(create_backbone()[0]) == fp
    random_model, _ = create_backbone(weights="random")
    assert weights_fingerprint(random_model) != fp


def test_no_offline_weights_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="weights=") as info:
        create_backbone("vit_small_patch14_dinov2")
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="weights="):
        create_backbone("vit_small_patch14_dinov2", pretrained=True)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("test_vit", weights=tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    src, dim = create_backbone("test_vit", weights="random")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(1)  # a different random init, overwritten by the file
    dst, dim2 = create_backbone("test_vit", weights=path)
    assert dim == dim2
    assert weights_fingerprint(dst) == weights_fingerprint(src)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(src(x), dst(x))


def test_file_with_classifier_loads_into_headless_model(tmp_path):
    src = create_classifier("test_efficientnet", weights="random")
    path = tmp_path / "full.pth"
    torch.save(src.state_dict(), path)
    model, dim = create_backbone("test_efficientnet", weights=path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(src.forward_head(src.forward_features(x), pre_logits=True), model(x))


def test_wrong_shape_file_raises(tmp_path):
    sd = create_backbone("test_efficientnet", weights="random")[0].state_dict()
    key = next(k for k, v in sd.items() if v.ndim == 4)
    sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 2)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="wrong shape"):
        create_backbone("test_efficientnet", weights=path)


def test_wrong_architecture_file_raises(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(create_backbone("test_vit", weights="random")[0].state_dict(), path)
    with pytest.raises(WeightsError, match="missing"):
        create_backbone("test_efficientnet", weights=path)


def test_not_a_state_dict_raises(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError):
        create_backbone("test_vit", weights=path)


def test_default_name():
    assert DEFAULT_BACKBONE == "tf_efficientnet_lite0"
