"""The cronsul agent every node runs: CLI, config, Consul membership and leadership, the Redis
queue, and job execution. Depends on :mod:`scheduler`, never the other way round."""
