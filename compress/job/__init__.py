"""Running a job: the pipeline of stages (baseline -> method -> rounds -> fine-tune -> final), its ledger
(state.pt, metrics.csv) and resume, the starting model (sources, checkpoints), process settings, the iterative
schedule's decisions, table-driven experiment configs and the hyper-parameter search objective.
"""
