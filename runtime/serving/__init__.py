"""r1c.runtime.serving: continuous batching, sampling and streaming for many callers of one bundle.

`ServingEngine` (engine.py) is the thread-safe API; `Scheduler` (scheduler.py) the loop; `SamplingParams` and the
sampler (sampling.py); `TextCodec` (text.py) the tokenizer and chat template; `RequestStream` (stream.py) the
token events. The HTTP server is `r1c.runtime.server`, the C ABI `r1c.runtime.capi`.
"""

from r1c.runtime.kvcache import OverCapacityError
from r1c.runtime.serving.engine import RequestHandle, ServingEngine
from r1c.runtime.serving.request import Observer, SchedulerConfig
from r1c.runtime.serving.sampling import SamplingParams
from r1c.runtime.serving.stream import RequestOutput, TokenEvent

__all__ = ["Observer", "OverCapacityError", "RequestHandle", "RequestOutput", "SamplingParams", "SchedulerConfig",
           "ServingEngine", "TokenEvent"]
