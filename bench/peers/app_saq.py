import asyncio
import os

from saq import Queue

from marks import mark_latency, mark_now

queue = Queue.from_url(os.environ["BENCH_REDIS_URL"])


async def noop(ctx):
    mark_now()


async def shell(ctx):
    proc = await asyncio.create_subprocess_exec("/bin/true")
    await proc.wait()
    mark_now()


async def stamp(ctx, *, enqueued):
    mark_latency(enqueued)


settings = {"queue": queue, "functions": [noop, shell, stamp], "concurrency": 10}
