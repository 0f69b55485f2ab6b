"""Slurm: energy and emissions per job on each node, without loading the controller.

The node's Prolog and Epilog hand carbond each job's metadata and end through a node-local spool directory
(:mod:`carbond.slurm.spool`); the attributor recognises Slurm's job and step cgroups
(:mod:`carbond.attribution.paths`) and labels their series (:mod:`carbond.attribution.labels`); a ledger per job
is written at job end. carbond never calls ``scontrol`` or ``squeue`` to measure a job.
"""
