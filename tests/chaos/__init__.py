"""cronsul's chaos suite: real agents, real faults, invariants checked from what actually ran.

Entry points: ``make chaos`` (scripts/chaos.py -> chaos.runner.main) and the short version in
tests/chaos/test_chaos_smoke.py. See docs/reliability.md.
"""
