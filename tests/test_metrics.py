"""The evaluate metrics against independent references on real images from ../shared/data."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from tasks.evaluate import metrics as M
from tasks.evaluate.backbones import (IMAGENET_MEAN, IMAGENET_STD, BackboneError, MobileNetV2Features, load_embedder,
                                      mobilenetv2_embedder)

SK_SSIM = dict(channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def real_images(shared_data):
    paths = [shared_data / "coco_hf_39769" / "000000039769.png", *sorted((shared_data / "coco_mmpose").glob("*.jpg")),
             *sorted((shared_data / "lvis" / "images").glob("*.jpg"))]
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in paths]


@pytest.fixture(scope="module")
def pairs(real_images):
    """(reference, distorted) pairs: Gaussian noise, real JPEG artefacts, blur."""
    rng = np.random.default_rng(0)
    out = []
    for i, a in enumerate(real_images[:2]):
        out.append((a, np.clip(a + rng.normal(0, 0.04 * (i + 1), a.shape), 0, 1)))
        out.append((a, _jpeg(a, 10 + 20 * i)))
        blurred = Image.fromarray((a * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1 + i))
        out.append((a, np.asarray(blurred, dtype=np.float64) / 255))
    return out


@pytest.fixture(scope="module")
def net():
    return MobileNetV2Features()


def _region(h: int, w: int) -> torch.Tensor:
    return M.overlap_mask(torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h], [0.4 * w, 0.0, 0.95 * w, 0.5 * h]]), h, w)


def test_psnr_matches_scikit_image_exactly(pairs):
    for a, b in pairs:
        assert M.psnr(_t(b), _t(a)).item() == pytest.approx(sk_psnr(a, b, data_range=1.0), rel=1e-12)
        m = _region(*a.shape[:2]).numpy()
        ref = sk_psnr(a[m], b[m], data_range=1.0)  # PSNR of the masked pixels only
        assert M.psnr(_t(b), _t(a), torch.from_numpy(m)[None]).item() == pytest.approx(ref, rel=1e-12)


def test_psnr_identical_is_capped_and_empty_mask_is_nan(real_images):
    a = _t(real_images[0])
    assert M.psnr(a, a).item() == M.PSNR_CAP_DB
    empty = torch.zeros(1, *a.shape[-2:], dtype=torch.bool)
    assert torch.isnan(M.psnr(a, a * 0.5, empty)).all()
    assert torch.isnan(M.ssim(a, a * 0.5, empty)).all()


def test_ssim_matches_scikit_image(pairs):
    for a, b in pairs:
        ref, smap = sk_ssim(a, b, full=True, **SK_SSIM)
        assert abs(M.ssim(_t(b), _t(a)).item() - ref) < 1e-6  # the brief asks 1e-3
        m = _region(*a.shape[:2]).numpy()
        valid = np.zeros(m.shape, bool)
        valid[5:-5, 5:-5] = True
        ref_m = smap.mean(2)[valid & m].mean()
        got_m = M.ssim(_t(b), _t(a), torch.from_numpy(m)[None]).item()
        assert abs(got_m - ref_m) < 1e-6
        # A region that is not the whole image must actually change the number.
        assert abs(got_m - ref) > 1e-4


def test_ssim_whole_image_mask_equals_full_ssim_and_torchmetrics(pairs):
    a, b = pairs[1]
    full = torch.ones(1, *a.shape[:2], dtype=torch.bool)
    ours = M.ssim(_t(b), _t(a)).item()
    assert M.ssim(_t(b), _t(a), full).item() == pytest.approx(ours, abs=1e-12)
    # torchmetrics' 2-D-window SSIM map, over the same interior pixels, as a second reference.
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a, b = a[100:260, 200:400], b[100:260, 200:400]  # torchmetrics' 2-D window is slow on CPU
    _, tm_map = tm_ssim(_t(b), _t(a), data_range=1.0, sigma=1.5, kernel_size=11, return_full_image=True)
    assert tm_map.mean(1)[:, 5:-5, 5:-5].mean().item() == pytest.approx(M.ssim(_t(b), _t(a)).item(), abs=1e-6)


def test_overlap_mask_is_box_intersection():
    m = M.overlap_mask(torch.tensor([[2.0, 2.0, 6.0, 6.0], [4.0, 3.0, 9.0, 9.0]]), 10, 10)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[3:6, 4:6] = True
    assert torch.equal(m, expected)
    three = M.overlap_mask(torch.tensor([[0.0, 0, 4, 4], [2.0, 2, 6, 6], [5.0, 5, 8, 8]]), 10, 10)
    assert three.sum() == 4 + 1  # pair (0,1): 2x2, pair (1,2): 1x1, pair (0,2): none


def test_lpips_proxy_symmetric_zero_and_monotone(real_images, net):
    img = real_images[1][::2, ::2]  # half resolution keeps the test quick
    a = _t(img).float()
    rng = np.random.default_rng(1)
    noisy = [_t(np.clip(img + rng.normal(0, s, img.shape), 0, 1)).float()
             for s in (0.02, 0.08, 0.2)]
    assert M.lpips_proxy(net, a, a).item() == pytest.approx(0.0, abs=1e-9)
    d = [M.lpips_proxy(net, n, a).item() for n in noisy]
    assert d[0] < d[1] < d[2]
    assert M.lpips_proxy(net, a, noisy[1]).item() == pytest.approx(d[1], rel=1e-6)
    m = _region(*a.shape[-2:])[None]
    dm = M.lpips_proxy(net, noisy[1], a, m).item()
    assert dm > 0 and dm != pytest.approx(d[1], rel=1e-3)
    full = torch.ones_like(m)
    assert M.lpips_proxy(net, noisy[1], a, full).item() == pytest.approx(d[1], rel=1e-6)


def _crops(images, n_per: int, size: int = 160, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        h, w = img.shape[:2]
        for _ in range(n_per):
            y, x = rng.integers(0, h - size), rng.integers(0, w - size)
            out.append(_t(img[y:y + size, x:x + size]))
    return torch.cat(out).float()


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's matrix square root: the independent reference."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _closed_form_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The hand-written distance torchmetrics replaced (kept here as the equivalence reference):
    with centred features A, B the trace term is the nuclear norm of A B^T / sqrt((n_a-1)(n_b-1))."""
    a, b = a.double(), b.double()
    ac, bc = a - a.mean(0), b - b.mean(0)
    tr_sqrt = torch.linalg.svdvals(ac @ bc.T).sum() / ((len(a) - 1) * (len(b) - 1)) ** 0.5
    return float((a.mean(0) - b.mean(0)).square().sum() + ac.square().sum() / (len(a) - 1)
                 + bc.square().sum() / (len(b) - 1) - 2 * tr_sqrt)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # rank-deficient covariances
def test_fid_proxy_self_zero_grows_with_noise_and_matches_references(real_images, net):
    imgs = _crops(real_images, 4, size=96)  # 24 real crops
    with torch.no_grad():
        feats = net(imgs)
    base = M.frechet_distance(feats, feats)
    assert abs(base) < 1e-3 * float(feats.var(0).sum())
    gen = torch.Generator().manual_seed(0)
    fids = []
    for s in (0.03, 0.1, 0.3):
        noisy = (imgs + s * torch.randn(imgs.shape, generator=gen)).clamp(0, 1)
        with torch.no_grad():
            fn = net(noisy)
        fids.append(M.frechet_distance(feats, fn))
    assert base < fids[0] < fids[1] < fids[2]
    # The independent reference: pytorch-fid's formula with scipy's sqrtm of the 1280 x 1280 product.
    assert fids[-1] == pytest.approx(_scipy_fid(feats.double().numpy(), fn.double().numpy()), rel=1e-6)
    # torchmetrics' FID with our stored MobileNetV2 features = the closed form it replaced
    assert [fids[-1], base] == pytest.approx([_closed_form_fid(feats, fn), _closed_form_fid(feats, feats)],
                                             rel=1e-6, abs=1e-3)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # rank-deficient covariances
def test_frechet_distance_matches_scipy_and_the_closed_form():
    """Sets smaller than the feature dimension (rank-deficient covariances) and larger."""
    gen = torch.Generator().manual_seed(0)
    for na, nb, d in ((7, 9, 16), (40, 50, 16), (3, 30, 16)):
        a = torch.randn(na, d, generator=gen, dtype=torch.float64)
        b = 1.3 * torch.randn(nb, d, generator=gen, dtype=torch.float64) + 0.5
        assert M.frechet_distance(a, b) == pytest.approx(_scipy_fid(a.numpy(), b.numpy()), rel=1e-6)
        assert M.frechet_distance(a, b) == pytest.approx(_closed_form_fid(a, b), rel=1e-6)
        assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-6)
    with pytest.raises(ValueError, match=">= 2 samples"):
        M.frechet_distance(a[:1], b)


def test_embedder_cosine_symmetric_and_one_on_identical(real_images):
    emb = mobilenetv2_embedder()
    crops = _crops(real_images, 2, seed=3)
    e = emb.embed(crops)
    assert e.shape == (crops.shape[0], 1280)
    assert torch.allclose(M.cosine(e, e), torch.ones(e.shape[0], dtype=torch.float64), atol=1e-6)
    flipped = emb.embed(crops.flip(0))
    assert torch.allclose(M.cosine(e, flipped), M.cosine(flipped, e))
    assert (M.cosine(e, flipped) < 0.999).any()


def test_load_embedder_reads_weights_never_code(tmp_path):
    """A DINOv2 Hugging Face folder runs on our ViT; a TorchScript file (it runs code when
    loaded: old code read it with torch.jit.load) and DreamSim are refused, naming the key."""
    from pics_model.config import DinoV2Arch
    from pics_model.dinov2 import DinoV2ViT
    from pics_model.testing import write_dinov2_hf_folder

    torch.manual_seed(0)
    vit = DinoV2ViT(DinoV2Arch(embed_dim=32, depth=1, num_heads=4, pos_embed_size=28, ffn="mlp"))
    folder = write_dinov2_hf_folder(vit, tmp_path / "dinov2")
    emb = load_embedder("dinov2", folder)
    x = torch.rand(2, 3, 50, 70)
    assert emb.embed(x).shape == (2, 32)
    resized = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(emb.embed(x), vit((resized - mean) / std)[:, 0], atol=1e-5)  # the CLS token
    script = tmp_path / "dinov2.pt"
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(script))
    with pytest.raises(BackboneError, match="dinov2.pt.*evaluate.dinov2_path.*run code"):
        load_embedder("dinov2", script, key="evaluate.dinov2_path")
    with pytest.raises(BackboneError, match="DreamSim.*run"):
        load_embedder("dreamsim", folder)
    with pytest.raises(BackboneError, match="no such file"):
        load_embedder("clip", tmp_path / "missing", key="evaluate.clip_path")
    (tmp_path / "hf").mkdir()
    with pytest.raises(BackboneError, match="config.json"):
        load_embedder("clip", tmp_path / "hf")
