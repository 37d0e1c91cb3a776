# amp.scale_loss (apex/amp/handle.py): scale the loss, unscale the grads, skip the step on overflow.
from __future__ import annotations

import contextlib

import torch

from moreh_ap.apex.amp._amp_state import _amp_state
from moreh_ap.apex.amp._process_optimizer import install_skip_step
from moreh_ap.precision_hooks import agree_overflow, set_loss_scale_source


def _as_optimizer_list(optimizers) -> list[torch.optim.Optimizer]:
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    for opt in opts:
        if not hasattr(opt, "_amp_stash"):
            raise RuntimeError(
                f"scale_loss got an optimizer ({type(opt).__name__}) that was not returned by amp.initialize; "
                "pass it through amp.initialize(model, optimizer, ...) first."
            )
    return opts


@contextlib.contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False):
    """Context manager yielding ``loss.float() * loss_scale`` for ``.backward()`` (apex's ``amp.scale_loss``).

    On exit the new gradients are unscaled into the optimizers' parameters (with O2, into the fp32
    master gradients; the fp16 model gradients stay scaled), and with a dynamic scale an inf/NaN
    among them halves the scale and makes the next ``step()`` of each optimizer given here a no-op
    that prints ``Gradient overflow.  Skipping step, loss scaler {loss_id} reducing loss scale to {scale}``.
    After 2000 clean exits in a row the scale doubles (at most ``max_loss_scale``).

    Args:
        loss: the loss tensor.
        optimizers: the optimizer(s) holding the parameters this backward reaches.
        loss_id: which loss scaler (``0 <= loss_id < num_losses``).
        model: unused (apex's signature).
        delay_unscale: leave the gradients scaled (gradient accumulation); the next ``scale_loss``
            without it unscales everything.
        delay_overflow_check: unscale but neither update the scale nor skip.
    """
    if not hasattr(_amp_state, "opt_properties"):
        raise RuntimeError(
            "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
            "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called "
            "before `with amp.scale_loss`."
        )
    if not _amp_state.opt_properties.enabled:
        yield loss
        return
    opts = _as_optimizer_list(optimizers)
    scaler = _amp_state.loss_scalers[loss_id]
    loss_scale = scaler.loss_scale()
    if not _amp_state.opt_properties.master_weights and not scaler.dynamic and loss_scale == 1.0:
        yield loss.float()
        return

    if not delay_unscale:
        for opt in opts:
            if not opt._amp_stash.params_have_scaled_gradients:
                opt._prepare_amp_backward()
    for opt in opts:  # a model's own backward run inside AP's training call is seeded with this scale
        set_loss_scale_source(opt, scaler.loss_scale)
    yield loss.float() * loss_scale

    if delay_unscale:
        for opt in opts:
            opt._amp_stash.params_have_scaled_gradients = True
        return
    scaler.clear_overflow_state()
    for opt in opts:
        opt._post_amp_backward(scaler)
        opt._amp_stash.params_have_scaled_gradients = False
    if not delay_overflow_check:
        for opt in opts:  # gradients spread over ranks (AP): every rank skips the same steps
            scaler._has_overflow = agree_overflow(opt, scaler._has_overflow)
    should_skip = False if delay_overflow_check else scaler.update_scale()
    if should_skip:
        for opt in opts:
            install_skip_step(opt, scaler, loss_id)
