# The one-line mode: hooks that make the user's own one-device training script train distributed.
"""What ``enable_advanced_parallelization()`` does to the user's objects.

While AP is enabled and not yet engaged, a few torch entry points are patched
(:mod:`~moreh_ap.oneline.patches`):

- ``nn.Module.__call__``: a probe (:mod:`~moreh_ap.oneline.probe`) that finds the ROOT, the outermost
  module whose call is a training forward over parameters of an optimizer created meanwhile
  (``torch.optim.Optimizer.__init__`` is wrapped to record them). At that call AP engages
  (:mod:`~moreh_ap.oneline.engage`): rank 0's inputs are broadcast, a ``ParallelConfig`` is chosen
  (:mod:`~moreh_ap.oneline.choose`: pinned by ``MOREH_AP_CONFIG`` or planned; rank 0's choice given to
  all), the model is parallelized, its class is swapped (:mod:`~moreh_ap.oneline.swap`) for a
  same-named subclass whose calls run the engine (:mod:`~moreh_ap.oneline.step`), and the probe is
  removed.
- ``nn.Module.cuda`` / ``nn.Module.to('cuda')``: deferred for modules with trainable parameters until
  engagement (the runtime then places what this rank keeps); on a machine without CUDA, ``.cuda()`` on
  modules and tensors is accepted and leaves them on the CPU, so a GPU script runs as written.
- ``torch.nn.utils.clip_grad_norm_``: on an engaged model's parameters, the global norm over stages and
  shards (the runtime's helper).

:mod:`moreh_ap.option` installs the hooks and hands them the user's options; this package never
reads the option module.
"""
from moreh_ap.oneline.choose import CONFIG_ENV, DUMP_FILE
from moreh_ap.oneline.engage import APNotEngagedError, OptimizerAlreadySteppedError
from moreh_ap.oneline.patches import install, install_failed, uninstall
from moreh_ap.oneline.state import engaged_model, is_engaged

__all__ = ["install", "install_failed", "uninstall", "is_engaged", "engaged_model", "CONFIG_ENV", "DUMP_FILE",
           "OptimizerAlreadySteppedError", "APNotEngagedError"]
