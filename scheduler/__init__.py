"""Pure scheduling for cronsul: schedule math, run identities and the leader's tick loop.

Nothing in this package imports redis, consul or boto3; it talks to the world through the
small protocols in :mod:`scheduler.ports`.
"""
