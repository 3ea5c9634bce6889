"""The instance's own watchdog (backends/serving/host.py, backends/core/worker_loop.py): how long
it has held work without progress, where, and its threads' stacks in the log (the orchestrator's
side, declaring it stuck: tests/test_health.py)."""
from __future__ import annotations

import threading
import time


def test_a_stalled_host_says_where_and_logs_its_threads_stacks_once(tiny_llama, tmp_path, monkeypatch, caplog):
    """The watchdog's view (the orchestrator's probe reads stats()): a response stuck in the
    sender counts as a stall there; past STACK_DUMP_AFTER_S every thread's stack is logged,
    once per stall; an idle host is not stalled."""
    import backends.serving.host as host_module
    from backends.colocated.worker import ColocatedWorker
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.limits import EngineLimits
    from backends.core.messages import GenerateRequest
    from backends.core.sampling import SamplingParams

    monkeypatch.setenv("DISTSERVE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(host_module, "STACK_DUMP_AFTER_S", 0.3)
    limits = EngineLimits(64, max_num_seqs=4, max_num_batched_tokens=128, block_size=4)
    worker = ColocatedWorker(LLMEngine(*tiny_llama, EngineConfig(dtype="float32", limits=limits)),
                             "colocated-0")
    release, sending = threading.Event(), threading.Event()

    def send(ctx, payload, final):                  # the hand-off to tritonserver never returns
        sending.set()
        release.wait(30)
    host = host_module.InstanceHost(worker, send, lambda ctx: False)
    try:
        time.sleep(0.2)
        assert host.stats()["stalled_s"] < 0.2 and host.stats()["stalled_in"] == ""   # idle
        host.submit(GenerateRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)), None)
        assert sending.wait(30)
        time.sleep(1.1)
        with caplog.at_level("ERROR", logger=host_module.__name__):
            s = host.stats()
            host.stats()
        assert s["stalled_in"] == "response sender" and s["stalled_s"] >= 1.0
        dumps = [r for r in caplog.records if "made no progress" in r.getMessage()]
        assert len(dumps) == 1 and "colocated-0-send" in dumps[0].getMessage()
        assert "_send_loop" in dumps[0].getMessage()
    finally:
        release.set()
        host.close()
