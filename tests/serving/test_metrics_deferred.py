"""serving.metrics.Deferred: metric records written after the answer, in one loop callback."""
import asyncio
import threading

from serving.metrics import Deferred


def test_records_wait_for_the_callback_then_all_run_in_order():
    seen: list = []

    async def main():
        deferred = Deferred(delay_s=0.02)
        deferred(seen.append, 1)
        deferred(seen.append, 2)
        assert seen == []  # nothing on the request path
        await asyncio.sleep(0.05)
        assert seen == [1, 2]
        deferred(seen.append, 3)  # a new queue schedules a new flush
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen == [1, 2, 3]


def test_a_failing_record_loses_no_other_and_never_raises_to_the_caller():
    seen: list = []

    def broken(_):
        raise RuntimeError("metrics agent gone")

    async def main():
        deferred = Deferred(delay_s=0.0)
        deferred(broken, 1)
        deferred(seen.append, 2)
        await asyncio.sleep(0.02)

    asyncio.run(main())
    assert seen == [2]


def test_outside_an_event_loop_it_records_at_once():
    seen: list = []
    deferred = Deferred()
    worker = threading.Thread(target=deferred, args=(seen.append, 7))  # a batch run in a worker thread
    worker.start()
    worker.join()
    assert seen == [7] and deferred._queue == []
