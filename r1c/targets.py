"""Facts about build targets that the CLI needs at start-up, in a module that imports nothing (`r1c --help` stays
fast; `r1c.runtime.trt_profiles` and the TensorRT builds take them from here)."""

DEFAULT_RTX_COMPUTE_CAPABILITY = "SM89"  # Ada (compute capability 8.9): the oldest architecture with FP8 tensor cores
