"""Facts about build targets that the CLI needs at start-up, in a module that imports nothing (`r1c --help` stays
fast; `r1c.runtime.trt_profiles` and the TensorRT builds take them from here)."""

DEFAULT_RTX_COMPUTE_CAPABILITY = "SM89"  # Ada (compute capability 8.9): the oldest architecture with FP8 tensor cores
# `r1c build --cpu-kernels` (older name --cpu-moe): float32 routed experts and MatMuls by a constant on r1c's CPU
# kernels ("r1c"), on ONNX Runtime's MoE and MLAS ("ort"), or the first where they build ("auto";
# runtime/build.py resolve_cpu_moe)
CPU_MOE_CHOICES = ("auto", "r1c", "ort")
# the session option weights_memory (`r1c build / run / serve --weights-memory`): where the weights of r1c's CPU
# kernels lie at load, read into the process's huge-page memory or mapped by ONNX Runtime (r1c.runtime.kernel_weights)
WEIGHTS_MEMORY = ("hugepages", "onnxruntime")
# The ONNX Runtime session options r1c reads (a bundle's target_options.session, `r1c build`'s session, load()'s
# session_options), each with its default in r1c.runtime.ort_backend.DEFAULT_OPTIONS (tests hold the two equal); any
# other name is refused (r1c.manifest.check_session), not ignored
SESSION_OPTIONS = ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                   "enable_mem_pattern", "dequantize_weights_at_load", "weights_memory", "native_decode")
