"""Launching training: torchrun lines (one node or many), Slurm batch scripts, per-rank setup,
and requeue after preemption. See docs/launch.md.

    layout.py    world size of nodes x ranks per node, checked against the config's tp*pp*cp
    env.py       the environment every rank gets (threads, accelerator, log prefixes)
    torchrun.py  the torchrun command line, and the agent entry that ignores SIGUSR1
    worker.py    the per-rank entry torchrun starts: `titans-scale train` plus per-rank log links
    slurm.py     the sbatch script (single/multi-node, job arrays), rendered with every value quoted
    requeue.py   `scontrol requeue` by rank 0 after a preemption checkpoint
    commands.py  the `titans-scale launch` and `titans-scale slurm submit` commands
"""
