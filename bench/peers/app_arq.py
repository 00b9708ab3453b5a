import asyncio
import os

from arq.connections import RedisSettings

from marks import mark_latency, mark_now


async def noop(ctx):
    mark_now()


async def shell(ctx):
    proc = await asyncio.create_subprocess_exec("/bin/true")
    await proc.wait()
    mark_now()


async def stamp(ctx, enqueued):
    mark_latency(enqueued)


class WorkerSettings:
    functions = [noop, shell, stamp]
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
    max_jobs = 10
    keep_result = 0           # results not kept: fire-and-forget
    poll_delay = 0.01         # default 0.5 s; arq polls a sorted set
    handle_signals = True
