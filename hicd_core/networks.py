"""The networks a run can train, by name: ``tiny-siam-cd`` (SPEC 4, the default) and ``fc-siam-diff`` (SPEC 4b).

Both expose the same interface (``forward(x1, x2, *, training, keep_cache, sync, rng)``,
``backward``, ``predict_logits``, ``state_dict``, ``config``) and the same distillation taps
(``E1 .. E4``, ``d1``, at the same resolutions), so that ``hicd_loss``, ``fit``, checkpoints,
``predict``, data parallelism and the adapters work with either, and a teacher of one kind can
distil into a student of the other.
"""

from __future__ import annotations

from .errors import CheckpointError
from .fc_siam import FCSiamDiff
from .io import load_checkpoint
from .model import TinySiamCD

__all__ = ["MODELS", "DEFAULT_MODEL", "build_model", "model_from_config", "model_name", "load_model"]

#: name -> class; the name is what ``TrainConfig.model`` and ``hicd train --model`` take.
MODELS = {"tiny-siam-cd": TinySiamCD, "fc-siam-diff": FCSiamDiff}
DEFAULT_MODEL = "tiny-siam-cd"
_BY_ARCH = {cls.__name__: name for name, cls in MODELS.items()}


def model_name(model) -> str:
    """The registry name of a network instance (``"tiny-siam-cd"``, ``"fc-siam-diff"``)."""
    return _BY_ARCH[type(model).__name__]


def build_model(name, widths, in_channels=3, *, dropout=None, bottleneck=None, **kwargs):
    """A new network ``name`` (one of ``MODELS``); ``dropout`` and ``bottleneck`` None take the network's defaults.

    ``kwargs`` go to the constructor (``xp``, ``dtype``, ``seed``, ``input_mean``, ``input_std``,
    ``per_image_norm``, ``conv_layout``). TinySiamCD has no dropout and no bottleneck choice: a rate
    above 0 or a bottleneck for it is a ``ValueError``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if MODELS[name] is TinySiamCD:
        if dropout:
            raise ValueError(f"model {name!r} has no dropout; got dropout={dropout!r}")
        if bottleneck is not None:
            raise ValueError(f"model {name!r} has no bottleneck choice; got bottleneck={bottleneck!r}")
        return TinySiamCD(widths, in_channels, **kwargs)
    options = {k: v for k, v in (("dropout", dropout), ("bottleneck", bottleneck)) if v is not None}
    return MODELS[name](widths, in_channels, **kwargs, **options)


def model_from_config(mc: dict, *, xp=None, dtype="float32"):
    """The network a checkpoint's ``model_config`` describes (its ``arch``), freshly initialised."""
    arch = mc.get("arch")
    if arch not in _BY_ARCH:
        raise ValueError(f"unknown architecture {arch!r}; this hicd builds {sorted(_BY_ARCH)}")
    return build_model(_BY_ARCH[arch], mc["widths"], mc.get("in_channels", 3), dropout=mc.get("dropout"),
                       bottleneck=mc.get("bottleneck"), xp=xp,
                       dtype=dtype, input_mean=mc.get("input_mean"), input_std=mc.get("input_std"),
                       per_image_norm=bool(mc.get("per_image_norm", False)))


def load_model(path, xp=None):
    """The network a checkpoint file describes (``TinySiamCD`` or ``FCSiamDiff``, its widths), ready for evaluation."""
    ck = load_checkpoint(path)
    mc = ck["model_config"]
    dtype = str(next(iter(ck["params"].values())).dtype)
    try:
        model = model_from_config(mc, xp=xp, dtype=dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_config {mc!r} ({exc})") from None
    model.load_state_dict(ck, source=str(path))
    return model, ck
