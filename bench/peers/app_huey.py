import os

from huey import RedisHuey

from marks import mark_latency, mark_now, run_true

# Blocking BRPOP dequeue (RedisHuey's default), no result storage for fire-and-forget tasks.
huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], results=False)


@huey.task()
def noop():
    mark_now()


@huey.task()
def shell():
    run_true()


@huey.task()
def stamp(enqueued):
    mark_latency(enqueued)
