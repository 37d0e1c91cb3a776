# The exceptions moreh_ap raises on purpose.


class NoFeasibleConfigError(RuntimeError):
    """No parallel configuration fits in device memory.

    Raised by the planner before anything is allocated on a device. The message
    gives the memory the best candidate requests against what is available
    (bytes) and the ways out (more devices, a smaller batch, allowing
    recomputation, parameter distribution or more pipeline stages).
    """
