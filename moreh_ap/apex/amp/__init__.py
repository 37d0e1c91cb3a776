# moreh_ap.apex.amp: apex.amp (O0-O3, scale_loss, master_params, state_dict) without apex, on CUDA or CPU.
"""``torch.moreh.apex.amp`` — apex's ``amp`` API, built on ``torch.autocast``.

A script written for apex runs unchanged after one line::

    amp = torch.moreh.apex.amp          # instead of: from apex import amp
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1")
    ...
    with amp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()

Opt levels (defaults; each can be overridden by the keyword of the same name):

=====================  =============  =========  =============  =============
property               O0             O1         O2             O3
=====================  =============  =========  =============  =============
cast_model_type        torch.float32  None       torch.float16  torch.float16
patch_torch_functions  False          True       False          False
keep_batchnorm_fp32    None           None       True           False
master_weights         False          None       True           False
loss_scale             1.0            dynamic    dynamic        1.0
=====================  =============  =========  =============  =============

* O0: fp32; inputs and outputs of the model's forward cast to fp32.
* O1: the forward of each model given to ``initialize`` runs under
  ``torch.autocast(device, dtype=torch.float16)`` — on CUDA and on CPU
  (torch 2.13's CPU autocast supports fp16; bf16 would need no loss scaling
  and so would not be apex's O1). apex patched torch functions process-wide;
  here only the models' forwards are autocast, plus torch.nn.functional's
  loss functions (and so the nn.*Loss modules): while O1 is the level, they
  cast fp16 arguments to fp32, so a loss computed outside the forward runs in
  fp32 as in apex (torch's backward rejects a mixed fp16/fp32 mse_loss,
  huber_loss or binary_cross_entropy). autocast's op lists are not apex's: on CUDA they are close
  (matmul/conv/linear in fp16; softmax, log_softmax, layer_norm, norms,
  exp/log/pow, sums and losses in fp32); on CPU, softmax, log_softmax,
  layer_norm, group_norm, exp, pow, sum, norm and cumsum stay in the
  input's dtype (apex: fp32), losses such as mse_loss, cross_entropy and
  binary_cross_entropy run in fp32 (apex: fp32, and binary_cross_entropy on
  fp16 is an error there). Binary ops promote to the widest type, as in apex.
* O2: the model is cast to fp16 except affine batch norms (fp32); inputs are
  cast to fp16 and outputs to fp32; the optimizer steps fp32 master copies
  of the fp16 parameters (created lazily, copied back after each step);
  ``model.state_dict()`` returns fp32 tensors.
* O3: pure fp16 (static loss scale 1).

``scale_loss`` uses apex's dynamic loss scaler (start 2**16, halved on an
inf/NaN gradient, doubled after 2000 clean ``scale_loss`` exits, bounded by
``min_loss_scale`` / ``max_loss_scale``), one scaler per loss
(``num_losses``); on overflow the next ``step()`` of the optimizers given to
that ``scale_loss`` is skipped with apex's message. A static scale never
skips. ``state_dict()`` / ``load_state_dict()`` save and restore the
scalers; ``master_params(optimizer)`` yields what the optimizer steps.

Deviations from apex: CPU models are accepted (apex required CUDA; no "An
input tensor was not cuda." warning); no ``DeprecatedFeatureWarning`` is
emitted; O2 also builds fp32 masters for bf16 parameters; O1 is
``torch.autocast`` (see above), so apex's ``amp.register_*_function``,
``half_function`` etc. and ``disable_casts`` are not provided, in-place
fp32-list ops on fp16 tensors do not raise. See docs/apex.md.
"""
from moreh_ap.apex.amp._amp_state import _amp_state, master_params
from moreh_ap.apex.amp.frontend import Properties, initialize, load_state_dict, opt_levels, state_dict
from moreh_ap.apex.amp.handle import scale_loss
from moreh_ap.apex.amp.scaler import LossScaler

__all__ = [
    "LossScaler",
    "Properties",
    "initialize",
    "load_state_dict",
    "master_params",
    "opt_levels",
    "scale_loss",
    "state_dict",
]
