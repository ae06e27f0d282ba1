"""LoopBatcher (serving/batching.py): what one event-loop turn brings becomes one call, in order,
bounded by max_batch_size; errors reach every caller of their batch and no other; the threaded mode
runs one batch at a time and the next takes everything that queued meanwhile."""
import asyncio
import threading

import pytest

from serving.batching import LoopBatcher


def run(coro):
    return asyncio.run(coro)


def test_requests_of_one_loop_turn_run_as_one_call_in_order():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * x for x in items]

    async def main():
        b = LoopBatcher(double, max_batch_size=16)
        return await asyncio.gather(*(b.submit(i) for i in range(5)))

    assert run(main()) == [0, 2, 4, 6, 8]
    assert calls == [[0, 1, 2, 3, 4]]


def test_a_lone_request_runs_at_once_and_batches_are_bounded():
    calls = []

    def ident(items):
        calls.append(len(items))
        return items

    async def main():
        b = LoopBatcher(ident, max_batch_size=4)
        assert await b.submit("alone") == "alone"
        return await asyncio.gather(*(b.submit(i) for i in range(10)))

    assert run(main()) == list(range(10))
    assert calls == [1, 4, 4, 2]  # the lone one, then 10 split 4 + 4 + 2, arrival order kept


def test_an_error_fails_every_caller_of_its_batch_and_not_the_next():
    def boom_on_3(items):
        if 3 in items:
            raise ValueError("bad item 3")
        return items

    async def main():
        b = LoopBatcher(boom_on_3, max_batch_size=2)
        results = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
        return results, await b.submit(7)

    results, after = run(main())
    assert results[:2] == [0, 1] and results[4:] == [4, 5]  # batches [0,1], [2,3], [4,5]
    assert all(isinstance(r, ValueError) and "bad item 3" in str(r) for r in results[2:4])
    assert after == 7


def test_a_wrong_number_of_results_is_an_error_not_a_misaligned_answer():
    async def main():
        b = LoopBatcher(lambda items: items[:-1], max_batch_size=8)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) and "1 results for 2 requests" in str(r) for r in run(main()))


def test_a_cancelled_caller_is_dropped_before_its_batch_runs():
    seen = []

    def ident(items):
        seen.extend(items)
        return items

    async def main():
        b = LoopBatcher(ident, max_batch_size=8, wait_s=0.05)
        gone = asyncio.ensure_future(b.submit("gone"))
        kept = asyncio.ensure_future(b.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    assert run(main()) == "kept" and seen == ["kept"]


def test_threaded_mode_runs_one_batch_at_a_time_off_the_loop_and_the_next_takes_what_queued():
    loop_thread, threads, sizes = threading.get_ident(), set(), []
    release = threading.Event()

    def slow(items):
        threads.add(threading.get_ident())
        sizes.append(len(items))
        release.wait(5)
        return items

    async def main():
        b = LoopBatcher(slow, max_batch_size=16, inline=False)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # batch [0] is running in its thread
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert sizes == [1]  # nothing started beside it
        release.set()
        return [await first] + [await r for r in rest]

    assert run(main()) == list(range(6))
    assert sizes == [1, 5] and loop_thread not in threads


def test_settings_are_checked():
    with pytest.raises(ValueError):
        LoopBatcher(lambda x: x, max_batch_size=0)
    with pytest.raises(ValueError):
        LoopBatcher(lambda x: x, wait_s=-1)
