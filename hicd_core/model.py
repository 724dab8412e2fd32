"""TinySiamCD: the compact Siamese change-detection network of SPEC section 4.

Shared encoder (four stages of two conv3x3-BN-ReLU blocks, stride 2 at the start
of stages 2-4), absolute-difference fusion per stage, a U-shaped decoder with
nearest x2 upsampling and concatenation, and a 1x1 conv head giving logits.
Forward and backward are composed from ``functional``'s stateless layer pairs.

Choices the SPEC leaves open:

* The shared encoder runs **once on the stacked pair** ``[x1; x2]`` (batch 2N):
  one set of larger matmuls instead of two, and the shared weights' gradients
  sum both phases automatically. Consequently the encoder's BatchNorm batch
  statistics are computed over both phases together (the PyTorch twin in the
  benchmarks does the same).
* Running statistics are the model's only mutable state besides the parameters:
  a training-mode forward replaces ``model.buffers`` entries with updated arrays.
  Caches are returned, never stored on the model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import backend
from .backend import array_namespace
from .io import check_state
from .functional import (
    CONV_LAYOUTS,
    CBRCache,
    absdiff_backward,
    absdiff_forward,
    cbr_backward,
    cbr_folded_forward,
    cbr_forward,
    concat_backward,
    concat_forward,
    conv2d_backward,
    conv2d_forward,
    upsample2x_backward,
    upsample2x_forward,
)

__all__ = ["TinySiamCD", "ModelState", "InputNormalisation", "DEFAULT_WIDTHS", "TAP_NAMES", "DECODER",
           "layer_table", "fold_conv_biases", "check_inputs", "checked_config", "checked_tap_grads"]

DEFAULT_WIDTHS = (16, 32, 64, 128)
TAP_NAMES = ("E1", "E2", "E3", "E4", "d1")
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def layer_table(widths, in_channels=3):
    """The network's topology (SPEC section 4): ``{name: (in channels, out channels, stride)}`` of every CBR.

    Encoder stages ``enc{k}.0`` (stride 2 from stage 2 on) and ``enc{k}.1``; decoder layers
    in ``DECODER`` order. Forward and backward both walk this table and ``DECODER``.
    """
    w1, w2, w3, w4 = widths
    layers = [("enc1.0", in_channels, w1, 1), ("enc1.1", w1, w1, 1)]
    for k in range(2, 5):
        layers += [(f"enc{k}.0", widths[k - 2], widths[k - 1], 2), (f"enc{k}.1", widths[k - 1], widths[k - 1], 1)]
    layers += [("dec4", w4, w3, 1), ("dec3", 2 * w3, w3, 1), ("dec2", w3 + w2, w2, 1), ("dec1", w2 + w1, w1, 1)]
    return {name: (cin, cout, stride) for name, cin, cout, stride in layers}


#: The decoder, in forward order: each layer and the encoder stage whose fusion it takes after
#: upsampling the layer before it (None: the deepest fusion, directly).
DECODER = (("dec4", None), ("dec3", 3), ("dec2", 2), ("dec1", 1))


def _initial_parameters(layers, widths, rng, xp, dtype):
    """Kaiming-normal convolutions (fan-in, ReLU gain) without bias, BatchNorm 1 / 0, running stats 0 / 1; the head's
    bias 0."""
    params, buffers = {}, {}
    zeros = lambda n: xp.zeros((n,), dtype=getattr(xp, dtype))  # noqa: E731
    ones = lambda n: xp.ones((n,), dtype=getattr(xp, dtype))  # noqa: E731
    for name, (cin, cout, _) in layers.items():
        # no convolution bias: BatchNorm's shift makes it redundant (SPEC 4), and its gradient is
        # rounding noise that AdamW would turn into lr-sized steps
        params[f"{name}.conv.weight"] = backend.normal(rng, (cout, cin, 3, 3), math.sqrt(2.0 / (cin * 9)), xp, dtype=dtype)
        params[f"{name}.bn.weight"] = ones(cout)
        params[f"{name}.bn.bias"] = zeros(cout)
        buffers[f"{name}.bn.running_mean"] = zeros(cout)
        buffers[f"{name}.bn.running_var"] = ones(cout)
    w1 = widths[0]
    params["head.weight"] = backend.normal(rng, (1, w1, 1, 1), math.sqrt(1.0 / w1), xp, dtype=dtype)
    params["head.bias"] = zeros(1)
    return params, buffers


#: The variance floor of per-image normalisation (inputs in [0, 1]: a standard deviation of at least 0.01),
#: so that a nearly constant image or tile is not blown up into its noise.
PER_IMAGE_EPS = 1e-4


class InputNormalisation:
    """``(x - mean) / std`` per input channel with fixed statistics (a training set's), or each image by its own
    (``per_image``: ``(x - mean_hw x) / sqrt(var_hw x + PER_IMAGE_EPS)`` per image and channel), or the identity."""

    def __init__(self, mean, std, channels, xp, dtype, per_image=False):
        if (mean is None) != (std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        if per_image and mean is not None:
            raise ValueError("per-image normalisation takes no input_mean / input_std (each image gives its own)")
        self.per_image = bool(per_image)
        self.mean = self.std = self._shift = self._scale = None
        if mean is None:
            return
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"input_mean and input_std need {channels} values each (one per input "
                             f"channel), got {len(mean)} and {len(std)}")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError(f"input_mean must be finite and input_std positive and finite, got {mean} and {std}")
        self.mean, self.std = mean, std
        shape, kind = (1, channels, 1, 1), getattr(xp, dtype)
        self._shift = xp.reshape(xp.asarray(mean, dtype=kind), shape)
        self._scale = xp.reshape(xp.asarray([1.0 / v for v in std], dtype=kind), shape)

    def __call__(self, x):
        if self.per_image:
            xp = array_namespace(x)
            centred = x - xp.mean(x, axis=(2, 3), keepdims=True)
            return centred / xp.sqrt(xp.mean(centred * centred, axis=(2, 3), keepdims=True) + PER_IMAGE_EPS)
        if self._shift is None:
            return x
        return (x - self._shift) * self._scale

    def config(self) -> dict:
        """The entries of a network's ``config()`` that rebuild this normalisation."""
        if self.per_image:
            return {"per_image_norm": True}
        if self.mean is None:
            return {}
        return {"input_mean": list(self.mean), "input_std": list(self.std)}


class ForwardCache(NamedTuple):
    n: int  # pairs in the batch
    encoder: list  # per stage: (cache of block .0, cache of block .1)
    fusion: list  # per stage: absdiff cache
    decoder: dict  # name -> (CBR cache, concat cache or None)
    head: object


class ModelState:
    """What a model holds besides its computation: ``params`` and ``buffers`` (dicts of arrays of
    ``dtype`` in namespace ``xp``), host copies of them, and checked loading."""

    params: dict
    buffers: dict
    dtype: str
    xp: object
    #: The weight of a training batch's statistics in BatchNorm's running ones (``train.precise_statistics``
    #: sets it per batch to average a fixed set of batches with equal weights).
    bn_momentum: float = BN_MOMENTUM

    def state_dict(self) -> dict:
        """Host (NumPy) copies: ``{"params": {...}, "buffers": {...}}``."""
        return {
            "params": {k: backend.to_host(v).copy() for k, v in self.params.items()},
            "buffers": {k: backend.to_host(v).copy() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict, *, source: str = "state") -> None:
        """Load host arrays after checking every key, shape and dtype (``io.check_state``); nothing is
        changed on error.

        A state written when the convolutions before BatchNorm still had biases (hicd 0.1 checkpoints)
        loads with each such bias folded into its BatchNorm's running mean
        (``fold_conv_biases``): the same network in evaluation, up to rounding.
        """
        state = fold_conv_biases(state, self.params)
        check_state(state, {"params": self.params, "buffers": self.buffers}, self.dtype, source)
        new = {(group, name): backend.from_host(state[group][name], self.xp, dtype=self.dtype)
               for group in ("params", "buffers") for name in getattr(self, group)}
        for (group, name), arr in new.items():
            getattr(self, group)[name] = arr

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.params.values())

    def _checked_pair(self, x1, x2, training, keep_cache):
        """The namespace and batch size of a forward pass's inputs, checked (both networks' first step)."""
        if training and not keep_cache:
            raise ValueError("keep_cache=False is for evaluation only (training=False): training needs the cache")
        check_inputs(x1, x2, self.in_channels, self.size_multiple)
        return array_namespace(x1, x2), x1.shape[0]


def checked_tap_grads(tap_grads) -> dict:
    """``tap_grads`` as a dict (None: empty), its names checked against ``TAP_NAMES``."""
    tap_grads = dict(tap_grads or {})
    unknown = set(tap_grads) - set(TAP_NAMES)
    if unknown:
        raise ValueError(f"unknown taps {sorted(unknown)}; available: {TAP_NAMES}")
    return tap_grads


def fold_conv_biases(state: dict, params: dict) -> dict:
    """``state`` with each ``<layer>.conv.bias`` that ``params`` lacks folded into ``<layer>.bn.running_mean``.

    ``BN(conv(x) + b)`` normalises with the batch mean in training, where ``b`` cancels, and with the
    running mean in evaluation, where ``(conv(x) + b - mean)`` equals ``conv(x) - (mean - b)``: so the
    bias-free layer with running mean ``mean - b`` is the same function. Returns a new dict (the given
    one is not changed); a state without such biases is returned as it is.
    """
    stale = [k for k in state.get("params", {}) if k.endswith(".conv.bias") and k not in params
             and f"{k[:-len('.conv.bias')]}.bn.weight" in params]
    if not stale or "buffers" not in state:
        return state
    new_params = {k: v for k, v in state["params"].items() if k not in stale}
    buffers = dict(state["buffers"])
    for key in stale:
        mean = f"{key[:-len('.conv.bias')]}.bn.running_mean"
        if mean in buffers:
            buffers[mean] = buffers[mean] - state["params"][key]
    return {**state, "params": new_params, "buffers": buffers}


class TinySiamCD(ModelState):
    """Siamese change-detection CNN with hand-derived backward.

    Parameters
    ----------
    widths : tuple of 4 ints
        Channel widths ``(w1, w2, w3, w4)`` of the encoder stages.
    in_channels : int
    xp : namespace, optional
        Where the parameters live (default NumPy); see ``hicd_core.backend.namespace``.
    dtype : str
        ``"float32"`` for training, ``"float64"`` for gradient checks.
    seed : int
        Seed of the host generator that draws the initial weights (Kaiming normal,
        fan-in, ReLU gain; biases 0; BatchNorm weight 1, bias 0).
    input_mean, input_std : sequences of ``in_channels`` floats, optional
        Per-channel input normalisation ``(x - mean) / std`` applied to both images
        before the encoder (``hicd_core.data.channel_stats`` computes them from a
        training set). They are part of ``config()`` and so of every checkpoint.
        None: the images go in as they are (SPEC section 4).
    per_image_norm : bool
        Standardise each image (t1 and t2 separately) by its own per-channel mean and standard
        deviation instead (``InputNormalisation``; a tile's own when predicting by tiles);
        exclusive with ``input_mean`` / ``input_std``; part of ``config()``.
    conv_layout : str
        The im2col layout of every convolution (``functional.CONV_LAYOUTS``; "auto" by
        default): a choice of speed, not of the model, so not part of ``config()``.

    Attributes
    ----------
    params : dict name -> array
        ``"<layer>.conv.weight"``, ``"<layer>.bn.weight"``, ``"<layer>.bn.bias"`` for layers ``enc1.0 ... enc4.1, dec4 ... dec1``, plus
        ``"head.weight"``, ``"head.bias"``.
    buffers : dict name -> array
        ``"<layer>.bn.running_mean"``, ``"<layer>.bn.running_var"``.
    """

    #: Input sides must be multiples of this (three stride-2 stages).
    size_multiple = 8

    def __init__(self, widths=DEFAULT_WIDTHS, in_channels=3, *, xp=None, dtype="float32", seed=0,
                 input_mean=None, input_std=None, per_image_norm=False, conv_layout="auto"):
        self.widths, self.in_channels, self.dtype = checked_config(widths, in_channels, dtype, conv_layout)
        self.seed = seed
        self.xp = xp if xp is not None else backend.namespace("numpy")
        self.conv_layout = conv_layout
        self.layers = layer_table(self.widths, self.in_channels)
        self.params, self.buffers = _initial_parameters(self.layers, self.widths, backend.host_rng(seed), self.xp,
                                                        dtype)
        self.input_norm = InputNormalisation(input_mean, input_std, self.in_channels, self.xp, dtype, per_image_norm)
        self.input_mean, self.input_std = self.input_norm.mean, self.input_norm.std

    def config(self) -> dict:
        return {"arch": "TinySiamCD", "widths": list(self.widths), "in_channels": self.in_channels,
                **self.input_norm.config()}

    def _cbr_forward(self, x, name, training, sync=None):
        y, cache, mean, var = cbr_forward(x, *_cbr_arrays(self, name), stride=self.layers[name][2], training=training,
                                          momentum=self.bn_momentum, eps=BN_EPS, layout=self.conv_layout, sync=sync)
        if training:  # the model's one piece of state besides the parameters
            self.buffers[f"{name}.bn.running_mean"], self.buffers[f"{name}.bn.running_var"] = mean, var
        return y, cache

    def _cbr_folded(self, x, name):
        return cbr_folded_forward(x, *_cbr_arrays(self, name), stride=self.layers[name][2], eps=BN_EPS,
                                  layout=self.conv_layout), None

    def forward(self, x1, x2, *, training=True, keep_cache=True, sync=None, rng=None):  # noqa: ARG002
        """Logits and distillation taps for a batch of pairs.

        Parameters
        ----------
        x1, x2 : arrays (N, in_channels, H, W), H and W multiples of 8
        training : bool
            BatchNorm with batch statistics (and running-statistic updates) if True.
        keep_cache : bool
            False (evaluation only, e.g. a frozen teacher or inference): no cache for
            ``backward`` is kept and None is returned in its place; each BatchNorm is
            folded into the convolution before it, which saves its passes over the
            activations (equal to the unfolded network up to rounding).
        sync : communicator, optional
            Synchronised BatchNorm across data-parallel ranks in training
            (``functional.batchnorm2d_forward``); ``backward`` follows it.
        rng : ignored
            This network has no dropout; the keyword is there so that the training loop calls
            every network alike (``FCSiamDiff`` draws its dropout masks from it).

        Returns
        -------
        logits : array (N, 1, H, W)
        taps : dict
            ``"E1".."E4"``: ``(t1 features, t2 features)``, each (N, w_k, H/2^(k-1), W/2^(k-1));
            ``"d1"``: change features (N, w1, H, W).
        cache : ForwardCache (pass to ``backward``), or None with ``keep_cache=False``
        """
        xp, n = self._checked_pair(x1, x2, training, keep_cache)
        if keep_cache:
            cbr = lambda h, name: self._cbr_forward(h, name, training, sync)  # noqa: E731
        else:
            cbr = self._cbr_folded
        stages, enc_caches, deltas, fusion_caches = _encoder_forward(cbr, self.input_norm(xp.concat([x1, x2], axis=0)),
                                                                     n, keep_cache, xp=xp)
        d, dec = _decoder_forward(cbr, deltas)
        logits, head_cache = conv2d_forward(d, self.params["head.weight"], self.params["head.bias"],
                                            layout=self.conv_layout)
        taps = {f"E{k + 1}": (s[:n, ...], s[n:, ...]) for k, s in enumerate(stages)}
        taps["d1"] = d
        if not keep_cache:
            return logits, taps, None
        return logits, taps, ForwardCache(n, enc_caches, fusion_caches, dec, head_cache)

    def backward(self, dlogits, cache: ForwardCache, tap_grads=None):
        """Parameter gradients from ``dlogits`` plus optional gradients for taps.

        Parameters
        ----------
        dlogits : array (N, 1, H, W)
        cache : ForwardCache from ``forward``
        tap_grads : dict, optional
            ``"E1".."E4"`` -> ``(g1, g2)`` (either may be None) and/or ``"d1"`` -> g,
            e.g. from ``hicd_loss``; added to the gradients flowing through those
            points.

        Returns
        -------
        grads : dict name -> array, one entry per parameter (shared encoder weights
            sum the contributions of both phases).
        """
        xp = array_namespace(dlogits)
        tap_grads = checked_tap_grads(tap_grads)
        grads = {}
        dd, grads["head.weight"], grads["head.bias"] = conv2d_backward(dlogits, cache.head)
        if tap_grads.get("d1") is not None:
            dd = dd + tap_grads["d1"]
        def cbr_backward_of(dy, cbr_cache: CBRCache, name, input_grad=True):  # a CBR's backward, into grads
            dx, dweight, _, dgamma, dbeta = cbr_backward(dy, cbr_cache, input_grad=input_grad)
            grads[f"{name}.conv.weight"], grads[f"{name}.bn.weight"], grads[f"{name}.bn.bias"] = dweight, dgamma, dbeta
            return dx

        _encoder_backward(_decoder_backward(dd, cache.decoder, cbr_backward_of), tap_grads, cache, cbr_backward_of,
                          xp=xp)
        return grads

    def predict_logits(self, x1, x2):
        """Evaluation-mode logits (running BatchNorm statistics, folded; no state change)."""
        return self.forward(x1, x2, training=False, keep_cache=False)[0]


# --------------------------------------------------------------------------- the walks of forward and backward


def checked_config(widths, in_channels, dtype, conv_layout):
    """The constructor's settings checked: ``(widths as a tuple, in_channels as an int, dtype)``."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {conv_layout!r}")
    return widths, int(in_channels), dtype


def _cbr_arrays(model, name):
    """A CBR's parameters and running statistics, in ``functional.cbr_forward``'s order."""
    p, b = model.params, model.buffers
    return (p[f"{name}.conv.weight"], None, p[f"{name}.bn.weight"], p[f"{name}.bn.bias"],
            b[f"{name}.bn.running_mean"], b[f"{name}.bn.running_var"])


def check_inputs(x1, x2, in_channels, multiple=8):
    """A network's input pair checked: same shape, ``(N, in_channels, H, W)``, H and W multiples of ``multiple``."""
    if tuple(x1.shape) != tuple(x2.shape):
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.ndim != 4 or x1.shape[1] != in_channels:
        raise ValueError(f"inputs must have shape (N, {in_channels}, H, W), got {tuple(x1.shape)}")
    if x1.shape[2] % multiple or x1.shape[3] % multiple:
        raise ValueError(f"input height and width must be multiples of {multiple}, got {tuple(x1.shape)}")


def _encoder_forward(cbr, h, n, keep_cache, *, xp):
    """The shared encoder on the stacked pair ``h = [x1; x2]`` (``n`` pairs); returns each stage's output,
    the CBR caches, the fusions ``|f1 - f2|`` and their caches (None without ``keep_cache``)."""
    stages, enc_caches, deltas, fusion_caches = [], [], [], []
    for k in range(1, 5):
        h, ca = cbr(h, f"enc{k}.0")
        h, cb = cbr(h, f"enc{k}.1")
        enc_caches.append((ca, cb))
        stages.append(h)
        if keep_cache:
            delta, fc = absdiff_forward(h[:n, ...], h[n:, ...])
        else:
            delta, fc = xp.abs(h[:n, ...] - h[n:, ...]), None
        deltas.append(delta)
        fusion_caches.append(fc)
    return stages, enc_caches, deltas, fusion_caches


def _decoder_forward(cbr, deltas):
    """The decoder over the fusions ``deltas`` (``DECODER`` order); returns ``d1`` and each layer's caches."""
    dec, d = {}, deltas[3]
    for name, stage in DECODER:
        cat_cache = None
        if stage is not None:
            up, _ = upsample2x_forward(d)
            d, cat_cache = concat_forward([up, deltas[stage - 1]])
        d, c = cbr(d, name)
        dec[name] = (c, cat_cache)
    return d, dec


def _decoder_backward(dd, caches, cbr_backward_of):
    """``DECODER`` in reverse from the gradient of ``d1``; returns the gradient of each stage's fusion."""
    ddeltas = [None] * 4
    for name, stage in reversed(DECODER):
        cbr_cache, cat_cache = caches[name]
        dd = cbr_backward_of(dd, cbr_cache, name)
        if stage is None:
            ddeltas[3] = dd
        else:
            dup, ddeltas[stage - 1] = concat_backward(dd, cat_cache)
            dd = upsample2x_backward(dup)
    return ddeltas


def _encoder_backward(ddeltas, tap_grads, cache, cbr_backward_of, *, xp):
    """The shared encoder, stage 4 to 1, on the stacked pair: each stage's gradient is its fusion's
    (plus the taps' gradients) and what flows back from the stage above."""
    dh, n = None, cache.n
    for k in (4, 3, 2, 1):
        da, db = absdiff_backward(ddeltas[k - 1], cache.fusion[k - 1])
        g1, g2 = tap_grads.get(f"E{k}") or (None, None)
        if g1 is not None:
            da = da + g1
        if g2 is not None:
            db = db + g2
        if dh is None:
            dstage = xp.concat([da, db], axis=0)
        else:  # dh is this backward pass's own fresh array: add both phases in place
            dh[:n, ...] += da
            dh[n:, ...] += db
            dstage = dh
        ca, cb = cache.encoder[k - 1]
        dh = cbr_backward_of(dstage, cb, f"enc{k}.1")
        # the images need no gradient: the first convolution skips its input gradient
        dh = cbr_backward_of(dh, ca, f"enc{k}.0", input_grad=k > 1)
