"""The sbatch templates (train.sbatch, sweep_array.sbatch; their syntax in README.md), shipped
as the package titans_scale.slurm so titans_scale.launcher.slurm reads them from any install."""
