"""`python -m grpo_jax.plan`: compile the run for a TPU slice that is not here (see __main__)."""
