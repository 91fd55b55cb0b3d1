"""Functions run inside the worker processes of a local world: ``run_distributed`` (gloo,
or NCCL on GPUs) pickles them by module path (``workers.<name>_cases``), so each worker
imports them from here; ``exit_cases.py`` is a script that ``test_exit.py`` runs under
torchrun."""
