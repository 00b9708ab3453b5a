import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from marks import mark_latency, mark_now, run_true

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop():
    mark_now()


@dramatiq.actor(max_retries=0)
def shell():
    run_true()


@dramatiq.actor(max_retries=0)
def stamp(enqueued):
    mark_latency(enqueued)
