"""What the tests and the worker modules share: ``oracle`` (the exact float64 references),
``worlds`` (the U x R factorisations a world runs, per-rank results to failures), ``example``
(the GPT example driver, and running a script quietly), ``megatron_args`` (USP flags parsed
with the Megatron-LM arguments validation reads; imports megatron.core), ``host_staged``
(point-to-point and all-to-all calls staged through host memory, so that several ranks
share one GPU over gloo)."""
