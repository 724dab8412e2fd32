"""Image-quality degradations and the quality-difference settings of SPEC section 5.

Images are float32 ``(C, H, W)`` in [0, 1]: RGB (C = 3) or any number of bands.
Every primitive acts band by band, with one draw of parameters for all bands;
JPEG codes an RGB image in YCbCr (as an encoder does) and any other band count one
band at a time, each as a grayscale JPEG with the luma table. Each primitive is a pure function of
(image, parameters); each *setting* is a pure function of (image, setting,
seed): ``degrade(image, setting, seed)`` draws its parameters from
``numpy.random.default_rng(seed)``, so the same seed gives the same low-quality
image on any machine. The output keeps the input's size (downsampled images are
resampled back up) so the pair stays aligned, and is clipped to [0, 1] before
any quantisation, so values never wrap around.

Settings (parameter ranges; ``U`` uniform, ``U{}`` uniform over integers):

``resolution-x4`` / ``resolution-x8``
    area (block-mean, antialiased) downsampling by 4 / 8, bicubic upsampling.
``single``
    one degradation drawn uniformly from:
    blur (isotropic sigma ~ U[0.5, 2.4], or with probability 1/2 anisotropic
    sigmas ~ U[0.5, 4] at an angle ~ U[0, pi); odd kernel 7..21),
    noise (sigma ~ U[3, 15] / 255),
    jpeg (quality ~ U{30..95}),
    haze (transmission ~ U[0.45, 0.75], airlight ~ U[0.75, 0.95]),
    low light (gamma ~ U[1.5, 2.5], gain ~ U[0.5, 0.85]),
    downsample (factor ~ U{2, 3, 4}, area down, bicubic up).
``multi``
    a random chain of 2 to 4 of blur -> resize -> noise -> jpeg, in that order
    (the order of second-order real-world degradation pipelines), with the same
    ranges as ``single``; resize is a downsample by a factor ~ U{2, 3, 4}.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft, ndimage

__all__ = [
    "SETTINGS",
    "degrade",
    "degrade_with_params",
    "resolution",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "haze",
    "low_light",
]

SETTINGS = ("resolution-x4", "resolution-x8", "single", "multi")
_SINGLE = ("blur", "noise", "jpeg", "haze", "lowlight", "downsample")
_CHAIN = ("blur", "resize", "noise", "jpeg")


def _check_image(image, name="image"):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] < 1:
        raise ValueError(f"{name} must have shape (C, H, W) (C bands, 3 for RGB), got {image.shape}")
    return image.astype(np.float32, copy=False)


def _clip(image):
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- primitives


def resolution(image, factor: int, up: str = "bicubic"):
    """Downsample by ``factor`` with area averaging (antialiased), then resample back up.

    When ``factor`` does not divide the size, the image is edge-padded to a
    multiple first and the result cropped back.
    """
    image = _check_image(image)
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    if factor == 1:
        return image.copy()
    C, H, W = image.shape
    Hp, Wp = math.ceil(H / factor) * factor, math.ceil(W / factor) * factor
    padded = np.pad(image, ((0, 0), (0, Hp - H), (0, Wp - W)), mode="edge")
    small = padded.reshape(C, Hp // factor, factor, Wp // factor, factor).mean(axis=(2, 4))
    order = {"bicubic": 3, "bilinear": 1, "nearest": 0}[up]
    big = ndimage.zoom(small, (1, factor, factor), order=order, mode="nearest", grid_mode=True)
    return _clip(big[:, :H, :W])


def _gaussian_kernel(sigma1, sigma2, angle, size):
    r = size // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma1) ** 2 + (v / sigma2) ** 2))
    return k / k.sum()


def gaussian_blur(image, sigma: float, sigma2: float | None = None, angle: float = 0.0):
    """Gaussian blur; anisotropic when ``sigma2`` is given (axes rotated by ``angle``).

    The kernel is odd-sized, ``2 ceil(3 max(sigma)) + 1`` clipped to [7, 21], and
    borders are reflected.
    """
    image = _check_image(image)
    if sigma <= 0 or (sigma2 is not None and sigma2 <= 0):
        raise ValueError(f"blur sigmas must be > 0, got {sigma}, {sigma2}")
    s2 = sigma if sigma2 is None else sigma2
    size = int(min(max(2 * math.ceil(3 * max(sigma, s2)) + 1, 7), 21))
    kernel = _gaussian_kernel(sigma, s2, angle, size).astype(np.float32)
    out = np.stack([ndimage.convolve(ch, kernel, mode="reflect") for ch in image])
    return _clip(out)


def gaussian_noise(image, sigma: float, seed):
    """Additive white Gaussian noise of standard deviation ``sigma`` (on the [0, 1] scale), clipped."""
    image = _check_image(image)
    rng = np.random.default_rng(seed)
    return _clip(image + rng.normal(0.0, sigma, image.shape).astype(np.float32))


_Q_LUMA = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)
_Q_CHROMA = np.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _quality_table(table, quality):
    """IJG scaling of a base quantisation table by a quality factor in [1, 100]."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((table * scale + 50.0) / 100.0), 1, 255)


def jpeg(image, quality: int, engine: str = "dct"):
    """JPEG-style compression at ``quality`` in [1, 100].

    ``engine="dct"`` (default, no extra dependency): RGB -> YCbCr, 8x8 block DCT
    (orthonormal DCT-II, ``scipy.fft``), quantisation with the standard IJG tables
    scaled by ``quality`` (no chroma subsampling), inverse. The image is clipped
    and rounded to 8 bits first, as a real encoder sees it. ``engine="pillow"``
    uses Pillow's encoder (the ``io`` extra).
    """
    image = _check_image(image)
    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be in [1, 100], got {quality}")
    pixels = np.round(_clip(image) * 255.0)
    if engine == "pillow":
        return _jpeg_pillow(pixels, quality)
    if engine != "dct":
        raise ValueError(f"unknown jpeg engine {engine!r}; choose 'dct' or 'pillow'")
    if pixels.shape[0] != 3:  # multispectral: every band coded alone, as a grayscale JPEG would be
        return _clip(np.round(np.clip(_dct_quantise(pixels - 128.0, [_Q_LUMA] * len(pixels), quality) + 128.0,
                                      0, 255)) / 255.0)
    r, g, b = pixels
    ycc = np.stack([
        0.299 * r + 0.587 * g + 0.114 * b,
        -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
        0.5 * r - 0.418688 * g - 0.081312 * b + 128.0,
    ]) - 128.0
    rec = _dct_quantise(ycc, [_Q_LUMA, _Q_CHROMA, _Q_CHROMA], quality) + 128.0
    y, cb, cr = rec[0], rec[1] - 128.0, rec[2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb])
    return _clip(np.round(np.clip(rgb, 0, 255)) / 255.0)


def _dct_quantise(planes, bases, quality):
    """8x8 block DCT of each plane (edge-padded), quantised with its IJG table at ``quality``, inverted."""
    C, H, W = planes.shape
    Hp, Wp = math.ceil(H / 8) * 8, math.ceil(W / 8) * 8
    planes = np.pad(planes, ((0, 0), (0, Hp - H), (0, Wp - W)), mode="edge")
    blocks = planes.reshape(C, Hp // 8, 8, Wp // 8, 8).transpose(0, 1, 3, 2, 4)
    coef = fft.dctn(blocks, type=2, axes=(-2, -1), norm="ortho")
    tables = np.stack([_quality_table(base, quality) for base in bases])[:, None, None]
    coef = np.round(coef / tables) * tables
    rec = fft.idctn(coef, type=2, axes=(-2, -1), norm="ortho")
    return rec.transpose(0, 1, 3, 2, 4).reshape(C, Hp, Wp)[:, :H, :W]


def _jpeg_pillow(pixels, quality):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("jpeg(engine='pillow') needs Pillow: pip install hicd[io]") from None
    import io as _io

    def code(array, mode):
        buf = _io.BytesIO()
        Image.fromarray(array.astype(np.uint8), mode=None).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert(mode), dtype=np.float32)

    if pixels.shape[0] == 3:
        out = code(pixels.transpose(1, 2, 0), "RGB").transpose(2, 0, 1) / 255.0
    else:  # multispectral: one grayscale JPEG per band
        out = np.stack([code(band, "L") for band in pixels]) / 255.0
    return _clip(out)


def haze(image, transmission: float, airlight: float):
    """Atmospheric scattering model ``I = J t + A (1 - t)`` with uniform transmission ``t``."""
    image = _check_image(image)
    if not 0 < transmission <= 1 or not 0 <= airlight <= 1:
        raise ValueError(f"need 0 < transmission <= 1 and 0 <= airlight <= 1, got {transmission}, {airlight}")
    return _clip(image * transmission + airlight * (1.0 - transmission))


def low_light(image, gamma: float, gain: float):
    """Low light: ``gain * image ** gamma`` (gamma > 1 darkens the mid-tones)."""
    image = _check_image(image)
    if gamma <= 0 or gain <= 0:
        raise ValueError(f"gamma and gain must be > 0, got {gamma}, {gain}")
    return _clip(gain * np.power(np.clip(image, 0, 1), gamma))


# --------------------------------------------------------------------------- settings


def _draw(rng, kind):
    """Parameters of one degradation ``kind`` (the ranges of the module docstring)."""
    if kind == "blur":
        if rng.random() < 0.5:
            return {"sigma": float(rng.uniform(0.5, 2.4))}
        return {"sigma": float(rng.uniform(0.5, 4.0)), "sigma2": float(rng.uniform(0.5, 4.0)),
                "angle": float(rng.uniform(0, math.pi))}
    if kind == "noise":
        return {"sigma": float(rng.uniform(3, 15) / 255.0), "seed": int(rng.integers(2**63))}
    if kind == "jpeg":
        return {"quality": int(rng.integers(30, 96))}
    if kind == "haze":
        return {"transmission": float(rng.uniform(0.45, 0.75)), "airlight": float(rng.uniform(0.75, 0.95))}
    if kind == "lowlight":
        return {"gamma": float(rng.uniform(1.5, 2.5)), "gain": float(rng.uniform(0.5, 0.85))}
    if kind in ("downsample", "resize"):
        return {"factor": int(rng.integers(2, 5))}
    raise AssertionError(kind)


def _apply(image, kind, params):
    if kind == "blur":
        return gaussian_blur(image, **params)
    if kind == "noise":
        return gaussian_noise(image, **params)
    if kind == "jpeg":
        return jpeg(image, **params)
    if kind == "haze":
        return haze(image, **params)
    if kind == "lowlight":
        return low_light(image, **params)
    return resolution(image, **params)


def degrade_with_params(image, setting: str, seed):
    """``degrade`` that also returns the list of ``(kind, params)`` it applied."""
    image = _check_image(image)
    if setting not in SETTINGS:
        raise ValueError(f"unknown quality setting {setting!r}; choose one of {SETTINGS}")
    rng = np.random.default_rng(seed)
    if setting.startswith("resolution-x"):
        steps = [("downsample", {"factor": int(setting.rsplit("x", 1)[1])})]
    elif setting == "single":
        kind = _SINGLE[int(rng.integers(len(_SINGLE)))]
        steps = [(kind, _draw(rng, kind))]
    else:
        count = int(rng.integers(2, 5))
        chosen = sorted(rng.choice(len(_CHAIN), size=count, replace=False))
        steps = [(_CHAIN[i], _draw(rng, _CHAIN[i])) for i in chosen]
    out = image
    for kind, params in steps:
        out = _apply(out, kind, params)
    return out, steps


def degrade(image, setting: str, seed):
    """Degrade one ``(C, H, W)`` float32 image in [0, 1] by a named setting; same shape and dtype.

    A pure function of ``(image, setting, seed)``; see the module docstring for
    the settings and their parameter ranges.
    """
    return degrade_with_params(image, setting, seed)[0]
