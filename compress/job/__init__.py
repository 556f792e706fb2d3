"""Running a job: the pipeline of stages (baseline -> method -> rounds -> fine-tune -> final), its ledger
(state.pt, metrics.csv) and resume, the starting model (sources, checkpoints), the iterative schedule's
decisions, composing the typed config (the ConfigStore, table-driven experiments) and the hyper-parameter
search objective.
"""
