# amp's front end (apex/amp/frontend.py): opt levels O0-O3, override rules, banner, initialize, state_dict.
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from moreh_ap.apex.amp._amp_state import _amp_state, maybe_print, warn_or_err
from moreh_ap.apex.amp._initialize import _initialize

_PROPERTY_NAMES = (
    "enabled",
    "opt_level",
    "cast_model_type",
    "patch_torch_functions",
    "keep_batchnorm_fp32",
    "master_weights",
    "loss_scale",
)


class Properties:
    """The seven amp options, validated on assignment with apex's rules."""

    def __init__(self) -> None:
        object.__setattr__(
            self,
            "options",
            {
                "enabled": False,
                "opt_level": None,
                "cast_model_type": None,
                "patch_torch_functions": False,
                "keep_batchnorm_fp32": None,
                "master_weights": None,
                "loss_scale": 1.0,
            },
        )

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"'Properties' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.options:
            object.__setattr__(self, name, value)
            return
        o1 = self.opt_level == "O1"
        if name == "cast_model_type":
            if o1 and value is not None and value is not False and value is not torch.float32:
                warn_or_err(
                    "O1 inserts casts around Torch functions rather than model weights, so with O1, "
                    "the model weights themselves should remain FP32. If you wish to cast the model "
                    f"to a different type, use opt_level='O2' or 'O3'. cast_model_type was {value}"
                )
        elif name == "patch_torch_functions":
            if not o1 and value:
                warn_or_err("Currently, patch_torch_functions=True should only be set by selecting opt_level='O1'.")
        elif name == "keep_batchnorm_fp32":
            if o1 and value is not None:
                warn_or_err(
                    "With opt_level O1, batchnorm functions are automatically patched to run in FP32, "
                    f"so keep_batchnorm_fp32 should be None. keep_batchnorm_fp32 was {value}"
                )
            if isinstance(value, str) and value in ("True", "False"):
                value = value == "True"
            elif not (value is True or value is False or value is None):
                raise AssertionError(
                    "keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', "
                    f"or None, found keep_batchnorm_fp32={value}"
                )
        elif name == "master_weights":
            if o1 and value is not None:
                warn_or_err(
                    "It doesn't make sense to use master_weights with O1. "
                    "With O1, your model weights themselves should be FP32."
                )
        elif name == "loss_scale":
            if not (isinstance(value, str) and value == "dynamic"):
                value = float(value)
        self.options[name] = value


class _OptLevel:
    """One column of the opt-level table, with the banner's brief."""

    def __init__(self, brief: str, **props: Any) -> None:
        self.brief = brief
        self.props = props

    def __call__(self, properties: Properties) -> Properties:
        for name in _PROPERTY_NAMES:
            setattr(properties, name, self.props[name])
        return properties


opt_levels = {
    "O3": _OptLevel(
        "O3:  Pure FP16 training.",
        enabled=True, opt_level="O3", cast_model_type=torch.float16, patch_torch_functions=False,
        keep_batchnorm_fp32=False, master_weights=False, loss_scale=1.0,
    ),
    "O2": _OptLevel(
        "O2:  FP16 training with FP32 batchnorm and FP32 master weights.\n",
        enabled=True, opt_level="O2", cast_model_type=torch.float16, patch_torch_functions=False,
        keep_batchnorm_fp32=True, master_weights=True, loss_scale="dynamic",
    ),
    "O1": _OptLevel(
        "O1:  Insert automatic casts around Pytorch functions and Tensor methods.\n",
        enabled=True, opt_level="O1", cast_model_type=None, patch_torch_functions=True,
        keep_batchnorm_fp32=None, master_weights=None, loss_scale="dynamic",
    ),
    "O0": _OptLevel(
        "O0:  Pure FP32 training.\n",
        enabled=True, opt_level="O0", cast_model_type=torch.float32, patch_torch_functions=False,
        keep_batchnorm_fp32=None, master_weights=False, loss_scale=1.0,
    ),
}


def _print_options(properties: Properties) -> None:
    for name, value in properties.options.items():
        maybe_print("{:22} : {}".format(name, value), True)


def initialize(
    models,
    optimizers=None,
    enabled=True,
    opt_level="O1",
    cast_model_type=None,
    patch_torch_functions=None,
    keep_batchnorm_fp32=None,
    master_weights=None,
    loss_scale=None,
    cast_model_outputs=None,
    num_losses=1,
    verbosity=1,
    min_loss_scale=None,
    max_loss_scale=2.0**24,
):
    """Prepare model(s) and optimizer(s) for mixed precision at ``opt_level`` (apex's ``amp.initialize``).

    Args:
        models: a ``torch.nn.Module`` or a list of them (fp32, on CUDA or CPU).
        optimizers: an optimizer, a list of optimizers, or None.
        enabled: False returns the arguments untouched and makes ``scale_loss`` a no-op.
        opt_level: "O0" (fp32), "O1" (fp16 autocast around the forward), "O2" (fp16 model, fp32
            batch norm and fp32 master weights), "O3" (pure fp16). The letter O, not zero.
        cast_model_type, patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale:
            override the opt level's defaults (see the table in ``moreh_ap.apex.amp``).
        cast_model_outputs: dtype the model outputs are cast to (default fp32 when the model is cast).
        num_losses: number of losses (and loss scalers) used with ``scale_loss(..., loss_id=i)``.
        verbosity: 0 silences the banner and the overflow messages.
        min_loss_scale, max_loss_scale: bounds of the dynamic loss scale (default: none, 2**24).

    Returns:
        The model(s) and optimizer(s), in the shapes given (lists stay lists); only the model(s)
        when ``optimizers`` is None.

    Raises:
        RuntimeError: an unknown opt level, an override that contradicts it, an optimizer passed
            twice, a model already wrapped in (Distributed)DataParallel, or non-fp32 parameters.
        TypeError: models or optimizers of the wrong type.
    """
    _amp_state.opt_properties = Properties()
    _amp_state.verbosity = verbosity
    if not enabled:
        return models if optimizers is None else (models, optimizers)
    if not torch.backends.cudnn.enabled:
        raise RuntimeError("Amp requires torch.backends.cudnn.enabled = True")
    if not isinstance(opt_level, str) or opt_level not in opt_levels:
        raise RuntimeError(
            f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.  Note that in "
            "`O0`, `O1`, etc., the prefix O is the letter O, not the number zero."
        )
    level = opt_levels[opt_level]
    _amp_state.opt_properties = level(_amp_state.opt_properties)
    maybe_print("Selected optimization level {}".format(level.brief), True)
    maybe_print("Defaults for this optimization level are:", True)
    _print_options(_amp_state.opt_properties)

    _amp_state.min_loss_scale = min_loss_scale
    _amp_state.max_loss_scale = max_loss_scale

    maybe_print("Processing user overrides (additional kwargs that are not None)...", True)
    overrides = dict(
        enabled=enabled,
        opt_level=opt_level,
        cast_model_type=cast_model_type,
        patch_torch_functions=patch_torch_functions,
        keep_batchnorm_fp32=keep_batchnorm_fp32,
        master_weights=master_weights,
        loss_scale=loss_scale,
    )
    for name, value in overrides.items():
        if value is not None:
            setattr(_amp_state.opt_properties, name, value)
    maybe_print("After processing overrides, optimization options are:", True)
    _print_options(_amp_state.opt_properties)

    return _initialize(models, optimizers, _amp_state.opt_properties, num_losses, cast_model_outputs)


def state_dict(destination=None):
    """``{'loss_scaler0': {'loss_scale': ..., 'unskipped': ...}, ...}``, one entry per loss."""
    if destination is None:
        destination = OrderedDict()
    for idx, scaler in enumerate(_amp_state.loss_scalers):
        destination["loss_scaler%d" % idx] = {"loss_scale": scaler.loss_scale(), "unskipped": scaler._unskipped}
    return destination


def load_state_dict(state_dict):
    """Restore the loss scalers, positionally, with apex's warnings and errors."""
    scalers = _amp_state.loss_scalers
    if len(state_dict) != len(scalers):
        print("Warning: state_dict contains {} entries, while {} loss_scalers are used".format(
            len(state_dict), len(scalers)))
    state_dict = state_dict.copy()
    unexpected_keys = []
    idx = 0
    for key in state_dict:
        if "loss_scaler" not in key:
            unexpected_keys.append(key)
            continue
        if idx > len(scalers) - 1:
            print("Skipping loss_scaler[{}], since num_losses was set to {}".format(idx, len(scalers)))
            break
        scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
        scalers[idx]._unskipped = state_dict[key]["unskipped"]
        idx += 1
    if unexpected_keys:
        raise RuntimeError(
            "Error(s) in loading state_dict. Unexpected key(s) in state_dict: {}. ".format(
                ", ".join('"{}"'.format(k) for k in unexpected_keys)
            )
        )
