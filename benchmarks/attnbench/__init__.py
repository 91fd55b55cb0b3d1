"""The attention benchmark's parts, used by ``bench_attention.py`` and ``profile_attention.py``.

``configs`` (the command-line values: lengths, U x R, heads; standard library only, so the
tests import it too), ``flops`` (the FLOP convention), ``problems`` (inputs, shards,
errors), ``peers`` (one class per method compared), ``timing``, ``sweep`` (the guarded
run over every case), ``report`` (table, JSON, plot), ``profiling`` (the profiler's
parts) and ``world`` (joining the ranks). Nothing is imported here, so that
``attnbench.configs`` stays free of torch.
"""
