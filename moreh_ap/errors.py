# The exceptions moreh_ap raises on purpose.


class NoFeasibleConfigError(RuntimeError):
    """No parallel configuration fits in device memory.

    Raised by the planner before anything is allocated on a device. The message
    gives the memory the best candidate requests against what is available
    (bytes) and the ways out (more devices, a smaller batch, allowing
    recomputation, parameter distribution or more pipeline stages).
    """


class InputError(ValueError):
    """The user's call was wrong (e.g. a training step without a loss, a batch that cannot be split).

    Raised the same way on every rank, before any collective of the step: the runtime lets it
    propagate to the caller instead of treating it as a rank failure (which ends the process).
    """
